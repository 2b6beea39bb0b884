#!/usr/bin/env python3
"""AugLy's own edits, chained as DISC21's queries were: a held-out copy-detection check made by the library itself.

    python -m bench.augly_edits               # seeds 0 and 1 (about 7 minutes on 2 cores)
    python -m bench.augly_edits --seeds 1 --per-group 2

DISC21's queries (the Image Similarity Challenge) were made with AugLy, one to a few of its image functions in a row
with random parameters. The copy-detection set uses three of them (bench/copy_detection.py) and the other benches
edit with their own code; here every edit is an AugLy function, most of them used by no other bench: stripes of any
width, angle, density, style (solid, dotted, dashed) and opacity (``overlay_stripes``), pixels swapped at random
(``shuffle_pixels``), skew, sharpening, a vertical flip, a new aspect ratio, rotation by any angle (AugLy crops the
result to its largest upright rectangle), padding of any colour, scaling down to 15-35 %, Gaussian noise, colour
jitter, a palette of 6-31 colours (``convert_color``, dithered), the picture pasted on a drawn picture
(``overlay_onto_background_image``, 80-100 % opaque), blur, pixelization, JPEG quality 5-24, a drawn picture over it
(``overlay_image``), a crop of 40-90 % of each side, and the set's emoji + crop, caption + JPEG and screenshot frame.
Each group original of the copy-detection set gets 4 queries (``--per-group``), each 1, 2 or 3 of these (30 / 40 / 30 %)
drawn without repetition; the parameters are in ``EDITS``. Scored as bench/chained_edits.py scores its queries
(evaluate.py against the references, then with a quarter of the originals absent). Writes
bench/out/augly_edits.md (and .json).
"""

from __future__ import annotations

import sys

import numpy as np
from PIL import Image

from bench import chained_edits, copy_detection, unseen_edits

STREAM = 91
CHAIN_LENGTHS, CHAIN_WEIGHTS = (1, 2, 3), (0.3, 0.4, 0.3)
SET_EDITS = ("emoji_crop", "text_jpeg", "screenshot")  # the copy-detection set's own AugLy edits


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(1 << 30))


def _crop(image, rng, augly):
    width, height = _u(rng, 0.4, 0.9), _u(rng, 0.4, 0.9)
    x, y = _u(rng, 0.0, 1.0 - width), _u(rng, 0.0, 1.0 - height)
    return augly.crop(image, x1=x, y1=y, x2=x + width, y2=y + height)


EDITS = {  # name: (image, rng, augly.image) -> image
    "overlay_stripes": lambda image, rng, augly: augly.overlay_stripes(
        image, line_width=_u(rng, 0.1, 0.6), line_color=_colour(rng), line_angle=_u(rng, -90, 90),
        line_density=_u(rng, 0.2, 0.7), line_type=str(rng.choice(["solid", "dotted", "dashed"])),
        line_opacity=_u(rng, 0.5, 1.0)),
    "shuffle_pixels": lambda image, rng, augly: augly.shuffle_pixels(image, factor=_u(rng, 0.05, 0.25), seed=_seed(rng)),
    "skew": lambda image, rng, augly: augly.skew(image, skew_factor=_u(rng, -0.8, 0.8), axis=int(rng.integers(2))),
    "sharpen": lambda image, rng, augly: augly.sharpen(image, factor=_u(rng, 2, 20)),
    "vflip": lambda image, rng, augly: augly.vflip(image),
    "change_aspect_ratio": lambda image, rng, augly: augly.change_aspect_ratio(
        image, ratio=float(np.exp(_u(rng, np.log(0.5), np.log(2.0))))),
    "rotate": lambda image, rng, augly: augly.rotate(image, degrees=_u(rng, -180, 180)),
    "pad": lambda image, rng, augly: augly.pad(image, w_factor=_u(rng, 0.1, 0.5), h_factor=_u(rng, 0.1, 0.5),
                                               color=_colour(rng)),
    "scale": lambda image, rng, augly: augly.scale(image, factor=_u(rng, 0.15, 0.35)),
    "random_noise": lambda image, rng, augly: augly.random_noise(image, var=_u(rng, 0.005, 0.03), seed=_seed(rng)),
    "color_jitter": lambda image, rng, augly: augly.color_jitter(
        image, brightness_factor=_u(rng, 0.5, 1.6), contrast_factor=_u(rng, 0.5, 1.6), saturation_factor=_u(rng, 0, 2.5)),
    "palette": lambda image, rng, augly: augly.convert_color(image, mode="P", colors=int(rng.integers(6, 32))),
    "overlay_onto_background_image": lambda image, rng, augly: augly.overlay_onto_background_image(
        image, unseen_edits.shapes(int(rng.integers(500, 900)), int(rng.integers(400, 700)), rng),
        opacity=_u(rng, 0.8, 1.0), overlay_size=_u(rng, 0.35, 0.7), x_pos=_u(rng, 0, 0.5), y_pos=_u(rng, 0, 0.5)),
    "blur": lambda image, rng, augly: augly.blur(image, radius=_u(rng, 1, 3)),
    "pixelization": lambda image, rng, augly: augly.pixelization(image, ratio=_u(rng, 0.15, 0.4)),
    "encoding_quality": lambda image, rng, augly: augly.encoding_quality(image, quality=int(rng.integers(5, 25))),
    "overlay_image": lambda image, rng, augly: augly.overlay_image(
        image, unseen_edits.shapes(300, 300, rng), opacity=_u(rng, 0.5, 1.0), overlay_size=_u(rng, 0.2, 0.5),
        x_pos=_u(rng, 0, 0.6), y_pos=_u(rng, 0, 0.6)),
    "crop": _crop,
}


def apply(image: Image.Image, edit: str, rng: np.random.Generator) -> Image.Image:
    """One AugLy edit by name (``EDITS`` or ``SET_EDITS``) -> an RGB image."""
    if edit in SET_EDITS:
        return copy_detection.apply_edit(image, edit, rng)[0]
    augly, _ = copy_detection.augly()
    return EDITS[edit](image.convert("RGB"), rng, augly).convert("RGB")


def chain(original: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, list[str]]:
    """``original`` after 1-3 AugLy edits in a row -> (the edited image, the edits' names)."""
    count = int(rng.choice(CHAIN_LENGTHS, p=CHAIN_WEIGHTS))
    edits = [str(e) for e in rng.choice(tuple(EDITS) + SET_EDITS, count, replace=False)]
    image = original.convert("RGB")
    for edit in edits:
        image = apply(image, edit, rng)
    return image, edits


AUGLY = chained_edits.Chains("augly", STREAM, chain)


def main(argv=None) -> int:
    def markdown(results):
        return chained_edits.markdown(results, "AugLy's edits, chained (DISC21-style queries, held out)",
                                      "Each group original of the copy-detection set edited by 1-3 AugLy functions")

    return unseen_edits.seeded_bench(
        argv, __doc__.splitlines()[1], "augly_edits",
        lambda seed, work, args: chained_edits.run_seed(seed, work, args.per_group, AUGLY),
        markdown, chained_edits.per_group_argument,
    )


if __name__ == "__main__":
    sys.exit(main())
