"""The duplicates finder's reports: JSON, CSV, a self-contained HTML page (thumbnails inlined as base64 JPEG, no
external asset, works offline) and the terminal summary. Each ``*_bytes`` function returns the file's content; the
face writes it atomically."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

from ..errors import ImageError
from ..images import open_image
from ..search.duplicates import DuplicateReport

THUMB_SIDE = 160
MAX_HTML_THUMBS = 3_000  # thumbnails inlined at most (about 5-8 kB each); later members are listed without one
CSV_FIELDS = ("group", "size", "keep", "id", "path", "score", "match", "width", "height", "bytes", "mtime")


def json_bytes(report: DuplicateReport) -> bytes:
    return (json.dumps(report.as_dict(), ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def csv_bytes(report: DuplicateReport) -> bytes:
    """One row per member of a group; ``match`` is the path of its most similar member."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for number, group in enumerate(report.groups, 1):
        paths = {member.id: member.path for member in group.members}
        for member in group.members:
            writer.writerow([
                number, len(group.members), int(member.keep), member.id, member.path, f"{member.score:.6f}",
                paths.get(member.match, ""), member.width or "", member.height or "", "" if member.bytes is None else member.bytes,
                member.as_dict()["mtime"] or "",
            ])
    return out.getvalue().encode("utf-8")


def _size_text(member) -> str:
    return f"{member.width}\u00d7{member.height}" if member.width and member.height else "size unknown"


def summary_lines(report: DuplicateReport, limit: int | None = None) -> list[str]:
    """What the terminal shows: one line of totals, then each group with its kept image first."""
    run = report.run
    how = {"cached": "graph reused from the cache", "incremental": f"incremental: searched {run.searched}, "
           f"rescored {run.rescored}, removed {run.removed}", "full": f"searched {run.searched} images"}[run.mode]
    lines = [
        f"{len(report.groups)} groups, {report.duplicates} duplicates among {report.images} images "
        f"(threshold {report.threshold:g}, k {report.k}, {report.search} search"
        f"{', verified by ' + report.verified if report.verified else ''}; {how} in {run.seconds:.1f} s)"
    ]
    if report.saturated:
        lines.append(f"note: {report.saturated} images have {report.k} neighbours above the threshold: "
                     f"a larger --k may join more images to their groups")
    for number, group in enumerate(report.groups[:limit] if limit else report.groups, 1):
        lines.append(f"group {number}: {len(group.members)} images, keep {group.keep.path} ({_size_text(group.keep)})")
        for member in group.members[1:]:
            lines.append(f"  {member.score:7.4f}  {member.path}  ({_size_text(member)})")
    if limit and len(report.groups) > limit:
        lines.append(f"... {len(report.groups) - limit} more groups (write them all with --json, --csv or --html)")
    return lines


def thumbnail_data_uri(path: Path, side: int = THUMB_SIDE) -> str | None:
    """A ``data:image/jpeg;base64,...`` thumbnail of an image file, or None when it cannot be read."""
    try:
        picture = open_image(path, draft_size=side)
    except ImageError:
        return None
    from PIL import Image

    picture.thumbnail((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=80, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


STYLE = """
:root { color-scheme: light dark; --fg: #1b1f24; --muted: #57606a; --bg: #fff; --card: #f6f8fa; --line: #d0d7de;
  --keep: #1a7f37; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6edf3; --muted: #9da7b3; --bg: #0d1117; --card: #161b22;
  --line: #30363d; --keep: #3fb950; } }
body { font: 15px/1.45 system-ui, sans-serif; color: var(--fg); background: var(--bg); margin: 0 auto; padding: 1rem;
  max-width: 80rem; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.05rem; margin: 0 0 .5rem; }
.meta { color: var(--muted); }
section.group { border: 1px solid var(--line); border-radius: .5rem; padding: .75rem; margin: 1rem 0; background: var(--card); }
ol.members { list-style: none; display: flex; flex-wrap: wrap; gap: .75rem; padding: 0; margin: 0; }
ol.members li { width: 170px; }
figure { margin: 0; } figure img, .noimg { display: block; width: 160px; height: 160px; object-fit: contain;
  background: var(--bg); border: 2px solid var(--line); border-radius: .35rem; }
.noimg { display: grid; place-items: center; color: var(--muted); font-size: .85rem; }
li.keep img, li.keep .noimg { border-color: var(--keep); }
figcaption { font-size: .8rem; overflow-wrap: anywhere; }
.badge { display: inline-block; font-weight: 600; color: var(--keep); }
"""


def html_bytes(report: DuplicateReport, image_root: Path | None) -> bytes:
    """The report as one HTML file: every group with its members' thumbnails (inlined), scores, sizes."""
    e = html.escape
    thumbs = 0
    parts = [
        "<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Duplicates: {len(report.groups)} groups</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
        "<main>", f"<h1>{len(report.groups)} groups of duplicates, {report.duplicates} copies among {report.images} images</h1>",
        f'<p class="meta">Index {e(report.index or "")}; cosine threshold {report.threshold:g}, {report.k} neighbours per '
        f"image, {e(report.search)} search{', verified by ' + e(report.verified) if report.verified else ''}. "
        "The suggested image to keep (largest resolution, then the oldest file) comes first in each group. "
        "Nothing was deleted or moved.</p>",
    ]
    if not report.groups:
        parts.append("<p>No duplicates at this threshold.</p>")
    for number, group in enumerate(report.groups, 1):
        heading = f"group-{number}"
        parts.append(f'<section class="group" aria-labelledby="{heading}">')
        parts.append(f'<h2 id="{heading}">Group {number}: {len(group.members)} images, scores '
                     f"{group.score:.3f}\u2013{max(s for _, _, s in group.pairs):.3f}</h2>")
        parts.append('<ol class="members">')
        for member in group.members:
            uri = None
            if image_root is not None and thumbs < MAX_HTML_THUMBS:
                uri = thumbnail_data_uri(image_root / member.path)
                thumbs += uri is not None
            picture = (f'<img src="{uri}" alt="{e(member.path)}" width="160" height="160">' if uri
                       else '<span class="noimg">no preview</span>')
            label = '<span class="badge">Keep</span> ' if member.keep else f"{member.score:.4f} "
            facts = _size_text(member) + (f", {member.bytes:,} bytes" if member.bytes is not None else "")
            parts.append(f'<li class="{"keep" if member.keep else "copy"}"><figure>{picture}<figcaption>{label}'
                         f"{e(member.path)}<br><span class=\"meta\">{e(facts)}</span></figcaption></figure></li>")
        parts.append("</ol></section>")
    parts += ["</main>", "</body>", "</html>", ""]
    return "\n".join(parts).encode("utf-8")
