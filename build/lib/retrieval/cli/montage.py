"""A picture of a query and its results (PIL only: works on a headless server, no GUI toolkit)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from ..errors import ImageError, RetrievalError
from ..images import open_image

TILE = 200
CAPTION = 34
MARGIN = 8


def _tile(image: Image.Image | None, caption: str, font) -> Image.Image:
    tile = Image.new("RGB", (TILE, TILE + CAPTION), "white")
    if image is not None:
        thumb = image.copy()
        thumb.thumbnail((TILE, TILE), Image.Resampling.LANCZOS)
        tile.paste(thumb, ((TILE - thumb.width) // 2, (TILE - thumb.height) // 2))
    else:
        ImageDraw.Draw(tile).rectangle((0, 0, TILE - 1, TILE - 1), outline="grey")
    draw = ImageDraw.Draw(tile)
    for line_no, line in enumerate(caption.splitlines()[:2]):
        draw.text((4, TILE + 2 + 15 * line_no), line[:32], fill="black", font=font)
    return tile


def write_montage(
    out_path: str | os.PathLike,
    query_image: Image.Image,
    results: Sequence[tuple[str, float, Path | None]],
    columns: int = 5,
) -> Path:
    """Write a PNG/JPEG showing the query, then each result (relative path, score, absolute path or None) in a grid."""
    font = ImageFont.load_default()
    tiles = [_tile(query_image, "query", font)]
    for rank, (rel_path, score, absolute) in enumerate(results, start=1):
        try:
            image = open_image(absolute, draft_size=TILE) if absolute is not None else None
        except ImageError:
            image = None
        tiles.append(_tile(image, f"#{rank}  {score:.4f}\n{Path(rel_path).name}", font))
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * (TILE + MARGIN) + MARGIN, rows * (TILE + CAPTION + MARGIN) + MARGIN), "#e8e8e8")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (MARGIN + (i % columns) * (TILE + MARGIN), MARGIN + (i // columns) * (TILE + CAPTION + MARGIN)))
    out_path = Path(out_path)
    try:
        sheet.save(out_path)
    except (OSError, ValueError) as exc:
        raise RetrievalError(f"{out_path}: cannot write montage ({exc})") from None
    return out_path
