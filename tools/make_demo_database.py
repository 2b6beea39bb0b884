"""Write the demo image database: near-duplicate groups of scikit-image sample photos.

Each group is one photo: ``<name>/original.jpg`` plus seeded transformed views
``view-01.jpg`` ... (see ``retrieval.testsets.random_view``). ``coffee`` also gets one extra
view named ``café crème.jpg`` so the demo exercises a non-ASCII file name with a space.
A ``LICENSES.md`` records each photo's licence and source.

    .venv/bin/python -m tools.make_demo_database            # writes ./database
    .venv/bin/python -m tools.make_demo_database --out /tmp/db
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from bench import testsets  # noqa: E402

DEMO_PHOTOS = testsets.BUNDLED_PHOTOS[:12]  # the first twelve bundled photos; licences in database/LICENSES.md
VIEWS_PER_GROUP = 4  # original + 3 views
MAX_SIDE = 480  # px, longest side
QUALITY = 88  # JPEG quality
SEED = 2026
EXTRA_NAME = "coffee"
EXTRA_FILE = "café crème.jpg"


def licences_markdown(names, seed: int, views_per_group: int, max_side: int, quality: int) -> str:
    """Text of LICENSES.md for the given photo names and generation settings."""
    lines = [
        "# Demo database: image licences",
        "",
        "Every image here is derived from a sample photo bundled with scikit-image",
        "(`skimage.data`). Licence and source below are as stated in scikit-image's own",
        "documentation of each function (scikit-image 0.26).",
        "",
        "| Folder | Licence and source |",
        "|---|---|",
    ]
    for name in names:
        lines.append(f"| `{name}/` | {testsets.PHOTO_LICENCES[name]} |")
    lines += [
        "",
        "In each folder, `original.jpg` is the photo downscaled (LANCZOS) so its longest side is at most",
        f"{max_side} px; `view-01.jpg` ... `view-{views_per_group - 1:02d}.jpg` are derived from it by seeded random",
        "transformations (crop, rotation, flip, scale change, colour jitter, blur, JPEG re-encoding);",
        f"`{EXTRA_NAME}/{EXTRA_FILE}` is one more such view. All files are JPEG, quality {quality}.",
        "They were generated, reproducibly, by",
        "",
        "    .venv/bin/python -m tools.make_demo_database" + (f" --seed {seed}" if seed != SEED else ""),
        "",
        f"(seed {seed}; see `retrieval/testsets.py`).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "database",
                        help="output folder (default: the repository's database/)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"random seed (default {SEED})")
    args = parser.parse_args(argv)

    groups = testsets.make_view_groups(DEMO_PHOTOS, VIEWS_PER_GROUP, args.seed, max_side=MAX_SIDE)
    paths = testsets.write_view_groups(groups, args.out, quality=QUALITY)

    # One extra view of coffee: the next view in coffee's own random stream.
    extra = testsets.make_view_groups([EXTRA_NAME], VIEWS_PER_GROUP + 1, args.seed, max_side=MAX_SIDE)[0][1][-1]
    extra_path = args.out / EXTRA_NAME / EXTRA_FILE
    extra.save(extra_path, format="JPEG", quality=QUALITY)
    paths.append(extra_path)

    licences = args.out / "LICENSES.md"
    licences.write_text(licences_markdown(DEMO_PHOTOS, args.seed, VIEWS_PER_GROUP, MAX_SIDE, QUALITY), encoding="utf-8")
    print(f"wrote {len(paths)} images in {len(groups)} groups and {licences.name} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
