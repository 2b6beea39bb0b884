"""Named index settings: every preset builds a valid encoder, and index.py offers them all."""

import subprocess
import sys

import pytest

from conftest import REPO
from retrieval.models import backbones
from retrieval.descriptors.encoder import new_encoder_config
from retrieval.descriptors.encoder import EncoderRequest
from retrieval.descriptors.pooling import resolve_pooling_params
from retrieval.indexing.presets import PRESETS, preset_help

ENCODER_FIELDS = {"pooling", "pooling_params", "scales", "resize_rule", "input_size"}


def encoder_config(spec: dict):
    """What index.py --preset builds for a fresh database (EncoderRequest.new_config, without the weights lookup)."""
    encoder = spec["encoder"]
    return new_encoder_config(
        backbones.efficientnet_lite0_weights(),
        encoder.get("pooling", "max"),
        "float32",
        pooling_params=encoder.get("pooling_params"),
        scales=encoder.get("scales", (1.0,)),
        resize_rule=encoder.get("resize_rule", "squash-bicubic"),
        input_size=encoder.get("input_size"),
    )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_a_valid_encoder(name):
    spec = PRESETS[name]
    assert {"description", "encoder", "whiten"} <= set(spec) <= {"description", "encoder", "whiten", "copies"}
    assert set(spec.get("copies", {})) <= {"regions", "local_features", "verify"}
    assert isinstance(spec["description"], str) and spec["description"].strip()
    assert isinstance(spec["whiten"], bool)
    assert set(spec["encoder"]) <= ENCODER_FIELDS, f"{name}: not EncoderRequest fields: {set(spec['encoder']) - ENCODER_FIELDS}"
    EncoderRequest(**spec["encoder"])  # index.py passes these as build_index(**encoder_options)

    config = encoder_config(spec)
    encoder = spec["encoder"]
    assert config.backbone == "efficientnet-lite0" and config.dim == 1280
    assert config.pooling == encoder.get("pooling", "max")
    assert config.pooling_params == resolve_pooling_params(config.pooling, encoder.get("pooling_params"))
    assert config.scales == [float(s) for s in encoder.get("scales", (1.0,))]
    assert config.resize_rule == encoder.get("resize_rule", "squash-bicubic")
    assert config.input_size == encoder.get("input_size", 224)


def test_classic_is_the_default_recipe():
    classic = PRESETS["classic"]
    assert classic["whiten"] is False
    config = encoder_config(classic)
    assert (config.pooling, config.scales, config.resize_rule, config.input_size) == ("max", [1.0], "squash-bicubic", 224)


def test_a_measured_preset_beside_classic():
    """bench/quality.py chose one more preset; it must differ from the classic recipe."""
    others = [name for name in PRESETS if name != "classic"]
    assert others
    classic = encoder_config(PRESETS["classic"])
    for name in others:
        spec = PRESETS[name]
        # a preset differs by its global encoder, its whitening, or what it stores for copy detection
        assert encoder_config(spec).identity() != classic.identity() or spec["whiten"] or any(spec.get("copies", {}).values())


def test_index_help_lists_every_preset():
    result = subprocess.run(
        [sys.executable, str(REPO / "index.py"), "--help"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "--preset" in help_text
    for name in PRESETS:
        assert name in help_text
    assert "{" + ",".join(sorted(PRESETS)) + "}" in help_text


def test_preset_help_names_every_preset():
    text = preset_help()
    for name, spec in PRESETS.items():
        assert f"{name}: {spec['description']}" in text
