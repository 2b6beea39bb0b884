"""bench/augly_edits.py's queries: every AugLy edit runs here and changes the picture, a chain is 1-3 of them drawn
from its seed alone, and the queries are written where bench/chained_edits.py's scoring reads them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench import augly_edits, chained_edits

from conftest import demo_photo


@pytest.mark.parametrize("edit", list(augly_edits.EDITS) + list(augly_edits.SET_EDITS))
def test_every_edit_runs_and_changes_the_picture(edit):
    photo = demo_photo("coffee", 320)
    edited = augly_edits.apply(photo, edit, np.random.default_rng(0))
    assert edited.mode == "RGB" and min(edited.size) >= 16
    same_size = edited.size == photo.size
    assert not same_size or np.abs(np.asarray(edited, np.int16) - np.asarray(photo, np.int16)).mean() > 0.5


def test_a_chain_is_drawn_from_its_seed_alone():
    photo = demo_photo("chelsea", 320)
    first, edits = augly_edits.chain(photo, np.random.default_rng([0, augly_edits.STREAM, 3, 1]))
    again, same = augly_edits.chain(photo, np.random.default_rng([0, augly_edits.STREAM, 3, 1]))
    assert edits == same and np.array_equal(np.asarray(first), np.asarray(again))
    assert 1 <= len(edits) <= 3 and len(set(edits)) == len(edits)
    lengths = {len(augly_edits.chain(photo, np.random.default_rng([0, augly_edits.STREAM, 0, n]))[1]) for n in range(30)}
    assert lengths == {1, 2, 3}


def test_the_queries_are_written_as_the_chained_bench_writes_them(tmp_path):
    references = tmp_path / "references"
    for name in ("coffee", "rocket"):
        (references / name).mkdir(parents=True)
        demo_photo(name, 256).save(references / name / "original.jpg")
    (references / "_distractors").mkdir()
    made = chained_edits.write_queries(references, tmp_path / "augly-0", 0, 2, augly_edits.AUGLY)
    assert sorted(made) == ["coffee/q0.jpg", "coffee/q1.jpg", "rocket/q0.jpg", "rocket/q1.jpg"]
    for query, edits in made.items():
        assert Image.open(tmp_path / "augly-0" / query).mode == "RGB"
        assert set(edits) <= set(augly_edits.EDITS) | set(augly_edits.SET_EDITS)
