"""Named index settings (``index.py --preset NAME``): combinations measured by bench/quality.py.

Each preset is a set of ``EncoderRequest`` fields plus whitening; explicit command-line options override it.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "classic": {
        "description": "the classic recipe: max pooling (MAC) of the last conv layer, 224x224 squash, no whitening",
        "encoder": {"pooling": "max"},
        "whiten": False,
    },
}


def preset_help() -> str:
    return "; ".join(f"{name}: {spec['description']}" for name, spec in PRESETS.items())
