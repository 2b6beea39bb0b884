#!/usr/bin/env python3
"""A labelled copy-detection image set in the spirit of DISC21 (the Image Similarity Challenge), built offline.

    .venv/bin/python -m bench.copy_detection OUT            # 60 groups, 500 distractors (20-35 s)
    .venv/bin/python -m bench.copy_detection OUT --quick    # 12 groups, 100 distractors, JPEG sources only (~5 s)
    .venv/bin/python -m bench.copy_detection OUT --probe-augly   # which AugLy image functions run here

Everything comes from files that installed packages ship:

* **Sources**: the scikit-image bundled photos (``skimage.data``) and the photos and artworks of the Debian packages
  ``mate-backgrounds``, ``gnome-backgrounds``, ``ukui-wallpapers`` and ``plasma-workspace-wallpapers`` (found with
  ``dpkg-query -L``; jpg/png/webp, SVG skipped; one file per plasma wallpaper, its largest landscape image). Variants
  of one picture (several resolutions, light/dark or colour variants, ``cat`` = ``chelsea``) are merged by a name rule
  (same theme stem) and a perceptual check (correlation of 32x32 grey thumbnails and of ranked 64x64 colour-gradient
  maps); one per cluster is used, so no distractor is a hidden copy of a group's original. Near-blank images (grey
  std < 10) are dropped. ``--quick`` uses only the scikit-image photos and the JPEG wallpapers, which decode at a
  reduced DCT scale (the full set decodes 4096-px WebP and 5120-px PNG files: most of its build time).
* **Groups**: a seeded choice of the detailed sources (grey std >= 15). Each group is the original, its longest side
  ``MAX_SIDE`` (512) px, and ``EDITS_PER_GROUP`` (7) of the 8 ``EDIT_TYPES`` made with AugLy 1.0.0 (the library that
  made DISC21's queries); the type a group goes without rotates, so every type has the same count (+-1).
* **Distractors**: images that hold no group's original: whole sources that are not groups, tiles of them at several
  scales, some with their colours matched to a group original's histogram (hard negatives for colour descriptors),
  scikit-image extras (textures, microscopy, documents, synthetic images) and Fashion-MNIST test images (Debian
  ``dataset-fashion-mnist``, upscaled, alone or in grids). ``DISTRACTOR_EDIT_RATE`` of them get one of the same AugLy
  edits, so an overlay, a caption or a screenshot frame does not give a copy away.

Edit types (in file names, the manifest and per-edit AP): ``emoji_crop`` 1-2 Twemoji overlays then a crop keeping
70-90 % of each side; ``text_jpeg`` a 1-2 line caption then JPEG quality 10-35; ``screenshot`` pasted into AugLy's web
or mobile feed template; ``pad_rotate`` padded square then rotated 8-30 degrees; ``pixelize`` ratio 0.12-0.3;
``colour`` greyscale + contrast, saturation + brightness, or colour jitter; ``small_crop`` 25-40 % of the area;
``hflip`` mirrored. AugLy's ``meme_format`` (Pillow >= 10 removed ``getsize_multiline``) and
``perspective_transform`` (numpy 2 removed ``np.float``) fail here and are not used; nothing is patched.

Layout written by ``build(out_dir)`` (JPEG quality ``JPEG_QUALITY``; a top-level sub-folder starting with ``_`` holds
distractors, as ``evaluate.py --ground-truth folders`` reads it):

* all-vs-all: ``all/<group>/original.jpg``, ``all/<group>/<edit>.jpg``, ``all/_distractors/dNNNN.jpg``;
* copy detection: the database ``references/<group>/original.jpg`` + ``references/_distractors/dNNNN.jpg``, and the
  queries ``queries/<group>/<edit>.jpg`` (``evaluate.py --queries``), each relevant to its group's original only;
* ``manifest.json`` (every file with its group, edit and parameters, source, package, licence) and ``LICENSES/``
  (``SOURCES.md``, the packages' Debian copyright files, AugLy's licence and a note on its bundled assets).

The second protocol's files are hard links to the first's where the file system allows. Deterministic: every random
choice comes from ``numpy.random.default_rng([seed, stream, index])``, so which sources are groups and group ``k``'s
edits do not depend on how many groups or distractors are built, and the same seed, packages and library versions
give the same bytes.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageFont

MAX_SIDE = 512  # longest side of group originals and whole-photo distractors
LOAD_SIDE = 1024  # sources are decoded at most this large (distractor tiles are cut at this resolution)
JPEG_QUALITY = 90
DEFAULT_GROUPS, DEFAULT_DISTRACTORS = 60, 500
QUICK_GROUPS, QUICK_DISTRACTORS = 12, 100
MIN_RESERVED_SOURCES = 10  # detailed sources never used as groups, so there are whole-photo and tile distractors
EDIT_TYPES = ("emoji_crop", "text_jpeg", "screenshot", "pad_rotate", "pixelize", "colour", "small_crop", "hflip")
EDITS_PER_GROUP = 7
DISTRACTOR_EDIT_RATE = 0.35
# distractor kinds after the whole non-group photos, with their shares of the rest; colour_matched stands in for the
# many same-palette images of a large database (a colour histogram cannot tell them from a copy)
DISTRACTOR_MIX = (("photo_crop", 0.40), ("colour_matched", 0.20), ("skimage_extra", 0.12), ("fashion_mnist", 0.28))
WALLPAPER_PACKAGES = ("mate-backgrounds", "gnome-backgrounds", "ukui-wallpapers", "plasma-workspace-wallpapers")
FASHION_PACKAGE = "dataset-fashion-mnist"
BACKDROP_RGB = (90, 110, 140)  # desktop colour behind transparent wallpapers
QUICK_EXTENSIONS = (".jpg", ".jpeg")
# near-duplicate rule on (|grey correlation|, gradient-rank correlation); see near_duplicate
DUP_GREY, DUP_GREY_WITH_GRAD, DUP_GRAD_WITH_GREY, DUP_MEAN = 0.97, 0.90, 0.60, 0.80
BLANK_STD, GROUP_MIN_STD, GROUP_MIN_GRAD = 10.0, 15.0, 1.5
CAPTION_FONTS = (
    "Impact", "OpenSans-Bold", "IBMPlexSans-Bold", "Raleway-Bold", "SourceSansPro-Bold", "Pacifico", "Lobster_1.3",
    "Chunkfive", "LeagueSpartan-Bold", "IBMPlexMono-Bold", "Titillium-Bold", "KaushanScript-Regular",
)  # fmt: skip
CAPTIONS = (
    "so true", "look at this", "#throwback", "wow", "best day ever", "can't believe it", "mood", "weekend vibes",
    "repost", "LOL", "nature is amazing", "summer 2019", "follow for more", "goals", "me irl", "new wallpaper!",
    "who did this?", "guess where", "no filter", "#art", "Monday again", "share if you agree", "so beautiful",
    "found this online", "@friend look", "classic", "tag someone", "vibes only", "this is fine", "2 AM thoughts",
)  # fmt: skip

# scikit-image bundled images: name -> (role, licence from the function's docstring). "photo" may be a group, "extra"
# is a distractor only. Left out on purpose: stereo_motorcycle's right view (a near-duplicate of the left one) and
# lfw_subset (news photos of people, no licence stated).
SKIMAGE_IMAGES = {
    "astronaut": ("photo", "public domain (NASA; 'No known copyright restrictions, released into the public domain')"),
    "camera": ("photo", "CC0 (photographer Lav Varshney)"),
    "cat": ("photo", "CC0 (photographer Stefan van der Walt)"),
    "chelsea": ("photo", "CC0 (photographer Stefan van der Walt)"),
    "coffee": ("photo", "CC0 (photographer Rachel Michetti)"),
    "rocket": ("photo", "public domain (SpaceX)"),
    "hubble_deep_field": ("photo", "public domain (NASA)"),
    "immunohistochemistry": ("photo", "no known copyright restrictions"),
    "retina": ("photo", "CC0 1.0 (Häggström, Mikael (2014), WikiJournal of Medicine)"),
    "clock": ("photo", "public domain (photographer Stefan van der Walt)"),
    "coins": ("photo", "no known copyright restrictions (Brooklyn Museum collection)"),
    "moon": ("photo", "not stated in the docstring (scikit-image bundled data; the package is BSD-3-Clause)"),
    "stereo_motorcycle": ("photo", "not stated in the docstring (Middlebury 2014 stereo benchmark; left view only)"),
    "brick": ("extra", "CC0 (CC0Textures Bricks25)"),
    "grass": ("extra", "CC0 (CC0Textures Grass004)"),
    "gravel": ("extra", "CC0 (CC0Textures Gravel04)"),
    "cell": ("extra", "CC0 (Allen Institute for Cell Science)"),
    "colorwheel": ("extra", "not stated in the docstring (scikit-image bundled data; the package is BSD-3-Clause)"),
    "logo": ("extra", "scikit-image logo (not stated in the docstring; the package is BSD-3-Clause)"),
    "horse": ("extra", "CC0 (Andreas Preuss)"),
    "microaneurysms": ("extra", "CC0 (Andreas Maier)"),
    "page": ("extra", "not stated in the docstring (scikit-image bundled data; the package is BSD-3-Clause)"),
    "text": ("extra", "public domain ('No known copyright restrictions, released into the public domain')"),
    "checkerboard": ("extra", "synthetic (scikit-image, BSD-3-Clause package)"),
    "shepp_logan_phantom": ("extra", "public domain (synthetic phantom, scikit-image)"),
    "binary_blobs": ("extra", "synthetic (generated by scikit-image, seeded)"),
}


# --------------------------------------------------------------------------- sources


@dataclass
class Source:
    """One source image: where it comes from, its licence, its loader and, once loaded, its pixels."""

    key: str  # unique slug: "mate-ladybird", "skimage-astronaut"
    package: str  # Debian package, or "scikit-image"
    path: str  # installed file, or "skimage.data.<name>()"
    licence: str
    copyright: str
    role: str  # "photo" (may be a group) or "extra" (distractor only)
    family: str  # name-rule theme: the variants of one theme share it
    loader: Callable[[], Image.Image] = field(repr=False)
    licence_metadata: str | None = None  # what the upstream metadata says, when it says something else
    pixels: int = 0  # of the file as shipped
    image: Image.Image | None = field(default=None, repr=False)  # decoded, longest side <= LOAD_SIDE
    status: str = ""  # "group", "distractor" or "dropped: ..."

    def record(self) -> dict:
        out = {"key": self.key, "package": self.package, "path": self.path, "licence": self.licence,
               "copyright": self.copyright, "role": self.role, "status": self.status}
        if self.licence_metadata:
            out["licence_metadata"] = self.licence_metadata
        return out


def dpkg_files(package: str) -> list[str]:
    """Files an installed Debian package ships ([] when the package or dpkg is missing)."""
    try:
        listed = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True, check=False).stdout
    except OSError:
        return []
    return sorted(p for p in listed.splitlines() if p and os.path.isfile(p))


def package_version(package: str) -> str | None:
    try:
        done = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True, check=False)
    except OSError:
        return None
    return done.stdout.strip() or None


def parse_dep5(text: str) -> list[tuple[list[str], str, str]] | None:
    """The Files paragraphs of a machine-readable (DEP-5) copyright file: [(patterns, copyright, licence)], or None
    for a free-form file."""
    if not text.lstrip().startswith("Format:"):
        return None
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        last = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and last:
                fields[last] += "\n" + line.strip()
            elif ":" in line:
                last, _, value = line.partition(":")
                last = last.strip()
                fields[last] = value.strip()
        if "Files" in fields:
            licence = fields.get("License", "").splitlines()[0].strip() if fields.get("License") else ""
            holders = " / ".join(s.strip() for s in fields.get("Copyright", "").splitlines() if s.strip())
            paragraphs.append((fields["Files"].split(), holders, licence))
    return paragraphs


def dep5_lookup(paragraphs, path: str) -> tuple[str, str]:
    """(copyright, licence) of ``path``: the last Files paragraph whose pattern matches the path's tail (DEP-5)."""
    parts = path.strip("/").split("/")
    found = ("", "")
    for patterns, holders, licence in paragraphs:
        if any(p == "*" or fnmatch.fnmatchcase("/".join(parts[-(p.count("/") + 1) :]), p) for p in patterns):
            found = (holders, licence)
    return found


def _short_licence(text: str) -> str:
    lowered = text.lower()
    for pattern, name in ((r"creative commons attribution[- ]sharealike (\d\.\d)", "CC-BY-SA"),
                          (r"creative commons attribution (\d\.\d)", "CC-BY")):
        match = re.search(pattern, lowered)
        if match:
            return f"{name}-{match.group(1)}"
    return text


def freeform_lookup(text: str, path: str) -> tuple[str, str]:
    """gnome-backgrounds' free-form copyright file: an "Image Authors" list of ``- name`` entries, each block ending
    in its Copyright and "Licensed under" lines. (copyright, licence), or the package default."""
    name = os.path.basename(path)
    block = re.search(r"Image Authors:\s*\n(.*?)\n\S", text, re.S)
    if block:
        names: list[str] = []
        notes: list[str] = []
        for line in block.group(1).splitlines():
            line = line.strip()
            if line.startswith("- "):
                if notes:  # a new block starts
                    names, notes = [], []
                names.append(line[2:].rstrip(":").strip())
            elif line.startswith(("Copyright", "Licensed", "http")):
                notes.append(line)
                if line.startswith("Licensed") and any(fnmatch.fnmatchcase(name, n) for n in names):
                    licence = re.sub(r"^Licensed under\s*", "", line).rstrip(".")
                    return " / ".join(n for n in notes if n.startswith("Copyright")), _short_licence(licence)
    holders = " / ".join(s.strip() for s in re.findall(r"^\s+Copyright ©.*$", text, re.M))
    default = "GPL-2+" if "GNU General Public License" in text else "see copyright file"
    return holders, f"{default} (package default in the copyright file; this image is not listed individually)"


_COPYRIGHT_FILES: dict[str, tuple[str, list | None]] = {}


def package_licence(package: str, path: str) -> tuple[str, str]:
    """(copyright, licence) of an installed file as ``/usr/share/doc/<package>/copyright`` states it."""
    if package not in _COPYRIGHT_FILES:
        try:
            text = Path(f"/usr/share/doc/{package}/copyright").read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        _COPYRIGHT_FILES[package] = (text, parse_dep5(text))
    text, dep5 = _COPYRIGHT_FILES[package]
    if not text:
        return "", "unknown (no copyright file)"
    if dep5 is not None:
        holders, licence = dep5_lookup(dep5, path)
        return holders, licence or "unknown"
    return freeform_lookup(text, path)


def plasma_metadata(folder: Path) -> tuple[str | None, str | None]:
    """(licence, authors) from a plasma wallpaper's metadata.json or metadata.desktop."""
    if (folder / "metadata.json").is_file():
        try:
            plugin = json.loads((folder / "metadata.json").read_text(encoding="utf-8")).get("KPlugin", {})
            authors = ", ".join(a["Name"] for a in plugin.get("Authors", []) if a.get("Name"))
            return plugin.get("License"), authors or None
        except (OSError, ValueError):
            pass
    if (folder / "metadata.desktop").is_file():
        text = (folder / "metadata.desktop").read_text(encoding="utf-8", errors="replace")
        licence = re.search(r"^X-KDE-PluginInfo-License=(.*)$", text, re.M)
        author = re.search(r"^X-KDE-PluginInfo-Author=(.*)$", text, re.M)
        return (licence.group(1).strip() if licence else None), (author.group(1).strip() if author else None)
    return None, None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


_RESOLUTION = re.compile(r"[_-]\d{3,5}x\d{3,5}$")


def theme_family(stem: str) -> str:
    """Theme key of a wallpaper file name: resolution and light/dark suffixes removed."""
    return re.sub(r"[-_](d|l|dark|light|night|day)$", "", _RESOLUTION.sub("", stem), flags=re.I).lower()


def open_source_file(path: str) -> Image.Image:
    """Decode an image file to RGB, longest side <= LOAD_SIDE (JPEG: at a reduced DCT scale); transparency is
    composited on BACKDROP_RGB."""
    image = Image.open(path)
    scale = min(1.0, LOAD_SIDE / max(image.size))
    image.draft("RGB", (max(1, int(image.width * scale)), max(1, int(image.height * scale))))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        backdrop = Image.new("RGBA", image.size, BACKDROP_RGB + (255,))
        backdrop.alpha_composite(image.convert("RGBA"))
        image = backdrop
    image = image.convert("RGB")
    if max(image.size) > LOAD_SIDE:
        image.thumbnail((LOAD_SIDE, LOAD_SIDE), Image.LANCZOS)
    return image


def skimage_loader(name: str) -> Callable[[], Image.Image]:
    """A loader of one ``skimage.data`` image as RGB (bool and float images scaled to 0..255)."""

    def load() -> Image.Image:
        from skimage import data

        if name == "stereo_motorcycle":
            array = data.stereo_motorcycle()[0]
        elif name == "binary_blobs":
            array = data.binary_blobs(length=512, blob_size_fraction=0.08, volume_fraction=0.4, rng=7)
        else:
            array = getattr(data, name)()
        array = np.asarray(array)
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        elif array.dtype != np.uint8:
            array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
        if image.mode in ("RGBA", "LA"):
            backdrop = Image.new("RGBA", image.size, (255, 255, 255, 255))
            backdrop.alpha_composite(image.convert("RGBA"))
            image = backdrop
        return image.convert("RGB")

    return load


def wallpaper_candidates(package: str, files: Sequence[str]) -> list[tuple[str, str, str]]:
    """(path, key, family) of the images of one wallpaper package worth considering, sorted by path."""
    extensions = (".jpg", ".jpeg", ".png", ".webp")
    if package == "plasma-workspace-wallpapers":  # one file per wallpaper: its largest landscape image
        best: dict[str, tuple[int, str]] = {}
        for path in files:
            match = re.match(r".*/wallpapers/([^/]+)/contents/images/(\d+)x(\d+)\.\w+$", path)
            if match and path.lower().endswith(extensions):
                width, height = int(match.group(2)), int(match.group(3))
                if width >= height and (match.group(1) not in best or width * height > best[match.group(1)][0]):
                    best[match.group(1)] = (width * height, path)
        return [(best[name][1], "plasma-" + _slug(name), "plasma/" + name.lower()) for name in sorted(best)]
    prefix = {"mate-backgrounds": "mate", "gnome-backgrounds": "gnome", "ukui-wallpapers": "ukui"}.get(package, package)
    named: dict[str, list[tuple[int, str, str, tuple[int, int]]]] = {}
    for path in files:
        if not path.lower().endswith(extensions) or "/doc/" in path:
            continue
        stem = Path(path).stem
        name = _slug(_RESOLUTION.sub("", stem))
        name = name[len(prefix) + 1 :] if name.startswith(prefix + "-") else name
        try:
            with Image.open(path) as image:
                size = image.size
        except OSError:
            continue
        named.setdefault(name, []).append((size[0] * size[1], path, f"{prefix}/{theme_family(stem)}", size))
    out = []
    for name, versions in named.items():  # one picture at several resolutions: the largest gets the plain key
        versions.sort(key=lambda v: (-v[0], v[1]))
        for k, (_, path, family, size) in enumerate(versions):
            out.append((path, f"{prefix}-{name}" + (f"-{size[0]}x{size[1]}" if k else ""), family))
    return sorted(out)


def discover_sources(quick: bool = False) -> list[Source]:
    """Every candidate source before dedupe: the scikit-image photos, the wallpapers, then the scikit-image extras
    (the order decides which member of a near-duplicate cluster is kept, with pixels). ``quick``: JPEG wallpapers only."""
    import skimage

    photos, extras = [], []
    for name, (role, licence) in SKIMAGE_IMAGES.items():
        source = Source(key="skimage-" + _slug(name), package="scikit-image",
                        path=f"skimage.data.{name}()  (scikit-image {skimage.__version__})", licence=licence,
                        copyright=f"see the skimage.data.{name} docstring", role=role, family="skimage/" + name,
                        loader=skimage_loader(name))
        (photos if role == "photo" else extras).append(source)
    walls = []
    for package in WALLPAPER_PACKAGES:
        for path, key, family in wallpaper_candidates(package, dpkg_files(package)):
            if quick and not path.lower().endswith(QUICK_EXTENSIONS):
                continue
            holders, licence = package_licence(package, path)
            metadata_licence = None
            if package == "plasma-workspace-wallpapers":
                metadata_licence, authors = plasma_metadata(Path(path).parents[2])
                if authors:
                    holders = f"{holders} / artwork: {authors}" if holders else f"artwork: {authors}"
            try:
                with Image.open(path) as image:
                    pixels = image.width * image.height
            except OSError:
                continue
            walls.append(Source(key=key, package=package, path=path, licence=licence, copyright=holders, role="photo",
                                family=family, loader=lambda p=path: open_source_file(p),
                                licence_metadata=metadata_licence, pixels=pixels))
    return photos + walls + extras


# --------------------------------------------------------------------------- dedupe


def fingerprint(image: Image.Image) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(32x32 grey zero-mean unit vector, ranked 64x64 colour-gradient map as a unit vector, grey std, mean |gradient|)."""

    def unit(values: np.ndarray) -> np.ndarray:
        values = values.astype(np.float64).ravel()
        values = values - values.mean()
        norm = np.linalg.norm(values)
        return values / norm if norm > 0 else values

    grey = np.asarray(image.convert("L").resize((32, 32), Image.BILINEAR), np.float32)
    rgb = np.asarray(image.resize((65, 65), Image.BILINEAR), np.float32)
    gradient = np.hypot(np.abs(np.diff(rgb, axis=1))[:-1].max(-1), np.abs(np.diff(rgb, axis=0))[:, :-1].max(-1)).ravel()
    ranks = np.argsort(np.argsort(gradient, kind="stable"), kind="stable").astype(np.float64)
    fine = np.asarray(image.convert("L").resize((128, 128), Image.BILINEAR), np.float32)
    energy = float(np.abs(np.diff(fine, axis=1)).mean() + np.abs(np.diff(fine, axis=0)).mean())
    return unit(grey), unit(ranks), float(fine.std()), energy


def near_duplicate(grey_correlation: float, gradient_correlation: float) -> bool:
    """The perceptual check. Measured on these packages: resolution variants score (1.00, 1.00), colour variants of
    one design (0.99, 0.89), light/dark pairs of one drawing (0.90, 0.80); the closest unrelated pair (two smooth
    gradients) scores 0.90 grey with a low gradient correlation."""
    grey = abs(grey_correlation)
    return (grey >= DUP_GREY or (grey >= DUP_GREY_WITH_GRAD and gradient_correlation >= DUP_GRAD_WITH_GREY)
            or (grey + gradient_correlation) / 2 >= DUP_MEAN)


def _load_all(sources: list[Source]) -> list:
    """Each source's image, or the exception that stopped it (decoding releases the GIL: 4 threads, order kept)."""

    def load(source: Source):
        try:
            return source.loader()
        except Exception as exc:  # a source that does not load offline is left out, with the reason
            return exc

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return list(pool.map(load, sources))


def dedupe_sources(sources: list[Source]) -> tuple[list[Source], list[dict]]:
    """Load every source; drop unreadable and near-blank ones; cluster identical pixels, name-rule variants and
    perceptual near-duplicates and keep one per cluster (a photo before an extra, then the most pixels, then the
    first). A kept photo with too little detail becomes an extra. Returns (kept, records of the dropped with why)."""
    log, loaded = [], []
    for source, result in zip(sources, _load_all(sources)):
        if isinstance(result, Exception):
            source.status = f"dropped: does not load ({type(result).__name__})"
            log.append(source.record())
        else:
            source.image, source.pixels = result, source.pixels or result.width * result.height
            loaded.append(source)
    prints = [fingerprint(s.image) for s in loaded]
    parent = list(range(len(loaded)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    reason: dict[int, str] = {}
    digests: dict[str, int] = {}
    families: dict[str, int] = {}
    for i, source in enumerate(loaded):
        digest = hashlib.sha1(source.image.tobytes()).hexdigest()
        if digest in digests:
            union(digests[digest], i)
            reason[i] = "identical pixels to " + loaded[digests[digest]].key
        digests.setdefault(digest, i)
        if source.family in families:
            union(families[source.family], i)
            reason.setdefault(i, "same theme (name rule) as " + loaded[families[source.family]].key)
        families.setdefault(source.family, i)
    grey = np.stack([p[0] for p in prints])
    gradient = np.stack([p[1] for p in prints])
    grey_corr, gradient_corr = grey @ grey.T, gradient @ gradient.T
    for i in range(len(loaded)):
        for j in range(i + 1, len(loaded)):
            if near_duplicate(grey_corr[i, j], gradient_corr[i, j]):
                union(i, j)
                reason.setdefault(j, f"near-duplicate of {loaded[i].key} (grey {grey_corr[i, j]:+.3f}, "
                                     f"gradient {gradient_corr[i, j]:.3f})")
    clusters: dict[int, list[int]] = {}
    for i in range(len(loaded)):
        clusters.setdefault(find(i), []).append(i)
    keep = set()
    for members in clusters.values():
        members = [m for m in members if prints[m][2] >= BLANK_STD]
        if members:
            keep.add(min(members, key=lambda m: (loaded[m].role != "photo", -loaded[m].pixels, m)))
    kept = []
    for i, source in enumerate(loaded):
        if i in keep:
            if source.role == "photo" and (prints[i][2] < GROUP_MIN_STD or prints[i][3] < GROUP_MIN_GRAD):
                source.role = "extra"  # too little detail to be a group; still a fine distractor
            kept.append(source)
            continue
        if prints[i][2] < BLANK_STD:
            source.status = f"dropped: near-blank (grey std {prints[i][2]:.1f})"
        else:
            winner = next((k for k in clusters[find(i)] if k in keep), None)
            source.status = "dropped: " + (f"variant of {loaded[winner].key}" + (f" ({reason[i]})" if i in reason else "")
                                           if winner is not None else reason.get(i, "duplicate"))
        log.append(source.record())
        source.image = None
    return kept, log


_SOURCE_CACHE: dict[tuple, tuple[list[Source], list[dict]]] = {}


def load_sources(quick: bool = False) -> tuple[list[Source], list[dict]]:
    """``dedupe_sources(discover_sources(quick))``, kept in memory for later builds in this process (decoding is most
    of a build); the key holds the installed package versions."""
    import skimage

    key = (quick, skimage.__version__, *(package_version(p) for p in WALLPAPER_PACKAGES))
    if key not in _SOURCE_CACHE:
        _SOURCE_CACHE.clear()
        _SOURCE_CACHE[key] = dedupe_sources(discover_sources(quick))
    return _SOURCE_CACHE[key]


# --------------------------------------------------------------------------- edits (AugLy)


_ASSETS: dict[str, object] = {}  # loaded on first use: the emoji list, font character tables


def augly():
    """(augly.image, augly.utils), with AugLy's own deprecation warnings silenced (nothing else)."""
    warnings.filterwarnings("ignore", module=r"augly(\.|$)")
    import augly.image as imaugs
    import augly.utils as augly_utils

    return imaugs, augly_utils


def _emoji_files() -> list[str]:
    if "emoji" not in _ASSETS:
        _, utils = augly()
        _ASSETS["emoji"] = sorted(str(p) for p in Path(utils.EMOJI_DIR).rglob("*.png"))
    return _ASSETS["emoji"]


def _caption_indices(font: str, lines: Sequence[str]) -> list[list[int]] | None:
    """``overlay_text`` takes indices into the font's character table (its .pkl, a file AugLy ships and made);
    None when the font lacks a character."""
    key = "font:" + font
    if key not in _ASSETS:
        _, utils = augly()
        try:
            with open(os.path.join(utils.FONTS_DIR, font + ".pkl"), "rb") as handle:
                _ASSETS[key] = list(pickle.load(handle))
        except OSError:
            _ASSETS[key] = []
    position = {c: i for i, c in enumerate(_ASSETS[key])}
    if not position:
        return None
    try:
        return [[position[ord(c)] for c in line] for line in lines]
    except KeyError:
        return None


def _caption_width(font: str, lines: Sequence[str], font_size: float, size: tuple[int, int]) -> float:
    """Width of the longest caption line as a fraction of the image width, at overlay_text's pixel size."""
    _, utils = augly()
    face = ImageFont.truetype(os.path.join(utils.FONTS_DIR, font + ".ttf"), max(1, int(min(size) * font_size)))
    return max(face.getlength(line) for line in lines) / size[0]


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return round(float(rng.uniform(low, high)), 4)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _emoji_crop(image, rng, imaugs, utils) -> tuple[Image.Image, dict]:
    emojis, params = _emoji_files(), {"emojis": []}
    for _ in range(int(rng.integers(1, 3))):
        emoji = dict(emoji=os.path.relpath(emojis[int(rng.integers(len(emojis)))], utils.EMOJI_DIR),
                     emoji_size=_u(rng, 0.18, 0.35), opacity=_u(rng, 0.75, 1.0), x_pos=_u(rng, 0.0, 0.75),
                     y_pos=_u(rng, 0.0, 0.7))
        params["emojis"].append(emoji)
        image = imaugs.overlay_emoji(image, emoji_path=os.path.join(utils.EMOJI_DIR, emoji["emoji"]),
                                     **{k: v for k, v in emoji.items() if k != "emoji"})
    width, height = _u(rng, 0.7, 0.9), _u(rng, 0.7, 0.9)
    x1, y1 = _u(rng, 0.0, 1.0 - width), _u(rng, 0.0, 1.0 - height)
    params["crop"] = dict(x1=x1, y1=y1, x2=round(x1 + width, 4), y2=round(y1 + height, 4))
    return imaugs.crop(image, **params["crop"]), params


def _text_jpeg(image, rng, imaugs, utils) -> tuple[Image.Image, dict]:
    n_lines = int(rng.integers(1, 3))
    lines = [CAPTIONS[int(i)] for i in rng.choice(len(CAPTIONS), n_lines, replace=False)]
    font, indices = None, None
    for k in rng.permutation(len(CAPTION_FONTS)):
        indices = _caption_indices(CAPTION_FONTS[int(k)], lines)
        if indices is not None:
            font = CAPTION_FONTS[int(k)]
            break
    size = _u(rng, 0.09, 0.16)
    width = _caption_width(font, lines, size, image.size) if font else 0.0
    if width > 0.94:  # shrink so that the longest line fits
        size, width = round(size * 0.94 / width, 4), 0.94
    line_height = size * min(image.size) / image.size[1] + 0.02
    params = dict(text=lines, font=font, font_size=size, colour=_colour(rng), opacity=_u(rng, 0.85, 1.0),
                  x_pos=_u(rng, 0.02, max(0.02, 0.98 - width)),
                  y_pos=_u(rng, 0.02, max(0.03, 0.95 - n_lines * line_height)), quality=int(rng.integers(10, 36)))
    if font is not None:
        image = imaugs.overlay_text(image, text=indices, font_file=os.path.join(utils.FONTS_DIR, font + ".ttf"),
                                    font_size=size, opacity=params["opacity"], color=params["colour"],
                                    x_pos=params["x_pos"], y_pos=params["y_pos"])
    return imaugs.encoding_quality(image, quality=params["quality"]), params


def _screenshot(image, rng, imaugs, utils) -> tuple[Image.Image, dict]:
    params = dict(template=("web.png", "mobile.png")[int(rng.integers(2))], crop_src_to_fit=bool(rng.integers(2)))
    return imaugs.overlay_onto_screenshot(
        image, template_filepath=os.path.join(utils.SCREENSHOT_TEMPLATES_DIR, params["template"]),
        crop_src_to_fit=params["crop_src_to_fit"]), params


def _pad_rotate(image, rng, imaugs, utils) -> tuple[Image.Image, dict]:
    angle = _u(rng, 8.0, 30.0) * (1 if rng.integers(2) else -1)
    params = dict(pad_colour=_colour(rng), degrees=round(angle, 3))
    return imaugs.rotate(imaugs.pad_square(image, color=params["pad_colour"]), degrees=params["degrees"]), params


def _pixelize(image, rng, imaugs, utils) -> tuple[Image.Image, dict]:
    params = {"ratio": _u(rng, 0.12, 0.3)}
    return imaugs.pixelization(image, ratio=params["ratio"]), params


def _colour_edit(image, rng, imaugs, utils) -> tuple[Image.Image, dict]:
    kind = ("grayscale", "saturation_brightness", "color_jitter")[int(rng.integers(3))]
    params: dict = {"kind": kind}
    if kind == "grayscale":
        params["contrast"] = _u(rng, 0.8, 1.5)
        return imaugs.contrast(imaugs.grayscale(image), factor=params["contrast"]), params
    if kind == "saturation_brightness":
        params["saturation"] = _u(rng, 0.0, 0.3) if rng.integers(2) else _u(rng, 2.0, 3.5)
        params["brightness"] = _u(rng, 0.6, 0.8) if rng.integers(2) else _u(rng, 1.25, 1.6)
        return imaugs.brightness(imaugs.saturation(image, factor=params["saturation"]), factor=params["brightness"]), params
    params.update(brightness_factor=_u(rng, 0.6, 1.5), contrast_factor=_u(rng, 0.6, 1.6),
                  saturation_factor=_u(rng, 0.2, 2.5))
    return imaugs.color_jitter(image, **{k: v for k, v in params.items() if k != "kind"}), params


def _small_crop(image, rng, imaugs, utils) -> tuple[Image.Image, dict]:
    area, aspect = _u(rng, 0.25, 0.40), _u(rng, 0.75, 1.33)
    width = min(1.0, float(np.sqrt(area * aspect)))
    height = min(1.0, area / width)
    x1, y1 = _u(rng, 0.0, 1.0 - width), _u(rng, 0.0, 1.0 - height)
    params = dict(area=area, aspect=aspect, x1=x1, y1=y1, x2=round(min(1.0, x1 + width), 4),
                  y2=round(min(1.0, y1 + height), 4))
    return imaugs.crop(image, x1=x1, y1=y1, x2=params["x2"], y2=params["y2"]), params


def _hflip(image, rng, imaugs, utils) -> tuple[Image.Image, dict]:
    return imaugs.hflip(image), {}


EDITS = {"emoji_crop": _emoji_crop, "text_jpeg": _text_jpeg, "screenshot": _screenshot, "pad_rotate": _pad_rotate,
         "pixelize": _pixelize, "colour": _colour_edit, "small_crop": _small_crop, "hflip": _hflip}
assert tuple(EDITS) == EDIT_TYPES


def apply_edit(image: Image.Image, edit: str, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """One named edit (``EDIT_TYPES``) made of AugLy image functions -> (RGB image, the parameters drawn from rng)."""
    if edit not in EDITS:
        raise ValueError(f"unknown edit {edit!r}; expected one of {EDIT_TYPES}")
    imaugs, utils = augly()
    edited, params = EDITS[edit](image.convert("RGB"), rng, imaugs, utils)
    return edited.convert("RGB"), params


def probe_augly(size: int = 128) -> dict[str, str]:
    """Call every AugLy image function once with its defaults on a small gradient image: {name: "ok" or the error}."""
    imaugs, _ = augly()
    image = Image.fromarray(np.linspace(0, 255, size * size * 3).reshape(size, size, 3).astype(np.uint8))
    needs = {"overlay_image": {"overlay": image}, "overlay_onto_background_image": {"background_image": image},
             "masked_composite": {"mask": None}}
    out = {}
    for name in sorted(n for n in dir(imaugs.functional) if not n.startswith("_")):
        function = getattr(imaugs.functional, name)
        if not callable(function) or getattr(function, "__module__", "") != imaugs.functional.__name__:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                function(image.copy(), **needs.get(name, {}))
            out[name] = "ok"
        except Exception as exc:  # the point: which functions fail on this numpy / Pillow, and how
            out[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return out


# --------------------------------------------------------------------------- distractors


def resize_longest(image: Image.Image, side: int) -> Image.Image:
    """A copy with its longest side ``side`` (LANCZOS)."""
    scale = side / max(image.size)
    if abs(scale - 1.0) < 1e-9:
        return image.copy()
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)


def _whole(image: Image.Image) -> tuple[Image.Image, dict]:
    return resize_longest(image, MAX_SIDE), {"resize_longest": MAX_SIDE}


def random_tile(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """A tile at one of several scales (1/2, 1/3, 1/4 of each side, or a random 15-60 % of the area), 256-512 px."""
    width, height = image.size
    mode = ("half", "third", "quarter", "random")[int(rng.integers(4))]
    if mode == "random":
        area, aspect = _u(rng, 0.15, 0.6), _u(rng, 0.6, 1.6)
        fw = min(1.0, float(np.sqrt(area * aspect)))
        fh = min(1.0, area / fw)
    else:
        fw = fh = {"half": 1 / 2, "third": 1 / 3, "quarter": 1 / 4}[mode]
    tile_w, tile_h = max(16, int(width * fw)), max(16, int(height * fh))
    x, y = int(rng.integers(0, width - tile_w + 1)), int(rng.integers(0, height - tile_h + 1))
    tile = image.crop((x, y, x + tile_w, y + tile_h))
    side = int(rng.integers(256, MAX_SIDE + 1))
    if max(tile.size) > side:
        tile = resize_longest(tile, side)
    return tile, {"tile": mode, "box": [x, y, x + tile_w, y + tile_h], "of_size": [width, height]}


def match_colours(image: Image.Image, reference: Image.Image) -> Image.Image:
    """``image`` with each RGB channel's histogram matched to ``reference``'s (``skimage.exposure.match_histograms``)."""
    from skimage.exposure import match_histograms

    matched = match_histograms(np.asarray(image), np.asarray(reference.convert("RGB")), channel_axis=-1)
    return Image.fromarray(np.clip(np.rint(matched), 0, 255).astype(np.uint8))


def fashion_distractor(images: np.ndarray, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Fashion-MNIST test images alone or in a 2x2 / 3x3 grid, sometimes inverted, upscaled to 160-384 px."""
    k = (1, 2, 3)[int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
    picked = [int(i) for i in rng.choice(len(images), k * k, replace=False)]
    grid = np.zeros((28 * k, 28 * k), np.uint8)
    for n, i in enumerate(picked):
        row, col = divmod(n, k)
        grid[row * 28 : (row + 1) * 28, col * 28 : (col + 1) * 28] = images[i]
    if rng.integers(2):
        grid = 255 - grid  # dark on white, like a product shot
    side = int(rng.integers(160, 385))
    resample = (Image.NEAREST, Image.BICUBIC)[int(rng.integers(2))]
    return Image.fromarray(grid).resize((side, side), resample).convert("RGB"), {
        "fashion_mnist_test_indices": picked, "grid": k, "side": side}


# --------------------------------------------------------------------------- build


def group_edits(index: int) -> list[str]:
    """The EDITS_PER_GROUP edit types of group ``index``: the one(s) left out rotate over the groups."""
    left_out = len(EDIT_TYPES) - EDITS_PER_GROUP
    skip = {EDIT_TYPES[(index * left_out + k) % len(EDIT_TYPES)] for k in range(left_out)}
    return [e for e in EDIT_TYPES if e not in skip]


class _Writer:
    """Writes each image once under ``all/`` and links (or copies) it to its copy-detection path; records files."""

    def __init__(self, out: Path, link: bool):
        self.out, self.link, self.files, self.images = out, link, [], {}

    def add(self, rel_all: str, rel_copy_detection: str, image: Image.Image, meta: dict) -> None:
        path = self.out / rel_all
        path.parent.mkdir(parents=True, exist_ok=True)
        image.convert("RGB").save(path, "JPEG", quality=JPEG_QUALITY, optimize=True)
        data = path.read_bytes()
        info = dict(meta, size=list(image.size), bytes=len(data), sha1=hashlib.sha1(data).hexdigest())
        self.images[rel_all] = info
        self.files.append(dict(path=rel_all, protocol="all", **info))
        target = self.out / rel_copy_detection
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if not self.link:
                raise OSError
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)
        self.files.append(dict(path=rel_copy_detection, protocol="copy_detection", **info))


def _source_meta(source: Source) -> dict:
    return dict(source=source.key, package=source.package, source_path=source.path, licence=source.licence)


def _write_groups(writer: _Writer, sources: list[Source], seed: int) -> tuple[list[str], list[Image.Image]]:
    """Each group: its original and its edits (stream 1 of the seed). Returns (group names, originals)."""
    names, originals = [], []
    for index, source in enumerate(sources):
        name = f"g{index:03d}_{source.key}"
        original = resize_longest(source.image, MAX_SIDE)
        names.append(name)
        originals.append(original)
        base = dict(_source_meta(source), group=name)
        writer.add(f"all/{name}/original.jpg", f"references/{name}/original.jpg", original,
                   dict(base, role="original", edit="original", params={"resize_longest": MAX_SIDE}))
        for edit in group_edits(index):
            image, params = apply_edit(original, edit, np.random.default_rng([seed, 1, index, EDIT_TYPES.index(edit)]))
            writer.add(f"all/{name}/{edit}.jpg", f"queries/{name}/{edit}.jpg", image,
                       dict(base, role="query", edit=edit, params=params))
    return names, originals


def _distractor_kinds(count: int, n_pool: int, seed: int) -> list[str]:
    """The kind of each distractor: a fifth whole pool photos (at most the pool), the rest by DISTRACTOR_MIX,
    shuffled (stream 2)."""
    n_whole = min(n_pool, count // 5)
    rest = count - n_whole
    shares = np.array([share for _, share in DISTRACTOR_MIX])
    counts = np.floor(shares / shares.sum() * rest).astype(int)
    counts[0] += rest - counts.sum()
    kinds = ["photo_whole"] * n_whole + [kind for (kind, _), n in zip(DISTRACTOR_MIX, counts) for _ in range(int(n))]
    return [kinds[int(i)] for i in np.random.default_rng([seed, 2]).permutation(len(kinds))]


def _write_distractors(writer, count, pool, extras, names, originals, seed) -> list[str]:
    """``count`` distractors (stream 4 per distractor, whole-photo order stream 3). Returns their kinds."""
    from bench.testsets import load_fashion_mnist

    fashion = load_fashion_mnist("test")[0]
    fashion_meta = dict(source="fashion-mnist", package=FASHION_PACKAGE, source_path="t10k-images-idx3-ubyte",
                        licence=package_licence(FASHION_PACKAGE, "t10k-images-idx3-ubyte")[1])
    kinds = _distractor_kinds(count, len(pool), seed)
    whole_order = [int(i) for i in np.random.default_rng([seed, 3]).permutation(len(pool))]
    for index, kind in enumerate(kinds):
        rng = np.random.default_rng([seed, 4, index])
        source = None
        if kind == "photo_whole":
            source = pool[whole_order.pop()]
            image, params = _whole(source.image)
        elif kind == "photo_crop":
            source = pool[int(rng.integers(len(pool)))]
            image, params = random_tile(source.image, rng)
        elif kind == "colour_matched":
            source = pool[int(rng.integers(len(pool)))]
            image, params = _whole(source.image) if rng.random() < 0.3 else random_tile(source.image, rng)
            target = int(rng.integers(len(names)))
            image, params = match_colours(image, originals[target]), dict(params, colours_matched_to=names[target])
        elif kind == "skimage_extra":
            source = extras[int(rng.integers(len(extras)))]
            image, params = _whole(source.image) if rng.random() < 0.5 else random_tile(source.image, rng)
        else:
            image, params = fashion_distractor(fashion, rng)
        edit = None
        if rng.random() < DISTRACTOR_EDIT_RATE:
            edit = EDIT_TYPES[int(rng.integers(len(EDIT_TYPES)))]
            image, edit_params = apply_edit(image, edit, rng)
            params = dict(params, edit_params=edit_params)
        meta = fashion_meta if source is None else _source_meta(source)
        writer.add(f"all/_distractors/d{index:04d}.jpg", f"references/_distractors/d{index:04d}.jpg", image,
                   dict(meta, group=None, role="distractor", edit=edit, distractor_kind=kind, params=params))
    return kinds


def write_licences(out: Path, used: list[Source], dropped: list[dict]) -> None:
    """LICENSES/: SOURCES.md, the Debian copyright files of the packages used, AugLy's licence and asset notes."""
    folder = out / "LICENSES"
    folder.mkdir(parents=True, exist_ok=True)
    for package in sorted({s.package for s in used if s.package != "scikit-image"} | {FASHION_PACKAGE}):
        copyright_file = Path(f"/usr/share/doc/{package}/copyright")
        if copyright_file.is_file():
            shutil.copyfile(copyright_file, folder / f"{package}.copyright")
    _, utils = augly()
    dist = next(Path(utils.__file__).resolve().parents[1].parent.glob("augly-*.dist-info"), None)
    if dist and (dist / "LICENSE").is_file():
        shutil.copyfile(dist / "LICENSE", folder / "AUGLY-LICENSE.txt")
    (folder / "AUGLY-ASSETS.txt").write_text("\n".join([
        "Edits are made with AugLy 1.0.0 (MIT licence, Copyright (c) Meta Platforms, Inc. and affiliates).",
        "Overlays use AugLy's bundled assets, as AugLy's README states:",
        "1. Emojis (Twemoji) - Copyright 2020 Twitter, Inc and other contributors. Graphics licensed under CC-BY 4.0.",
        "2. Fonts - Noto fonts under the SIL Open Font License 1.1; the other fonts AugLy bundles carry their own free",
        "   licences (see the AugLy distribution).",
        "3. Screenshot templates - images created by a designer at Facebook specifically to use with AugLy.",
    ]) + "\n", encoding="utf-8")
    holders, licence = package_licence(FASHION_PACKAGE, "t10k-images-idx3-ubyte")
    lines = [
        "# Sources of this image set", "",
        "Every image is a source below, a tile of one, or an AugLy edit of one (see manifest.json). Licence texts: the",
        "Debian copyright files copied here (`<package>.copyright`), `/usr/share/common-licenses/` on Debian, and",
        "`AUGLY-*.txt` for the overlay assets. scikit-image images: see each `skimage.data` function's docstring.", "",
        "| source | used as | package | file | copyright | licence (copyright file) | licence (upstream metadata) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in used:
        cells = [s.key, s.status, s.package, s.path, s.copyright, s.licence, s.licence_metadata or ""]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    lines.append(f"| fashion-mnist | distractor | {FASHION_PACKAGE} | t10k-images-idx3-ubyte | {holders} | {licence} | |")
    lines += ["", "## Candidates left out", "", "| source | package | file | why |", "|---|---|---|---|"]
    lines += [f"| {d['key']} | {d['package']} | {d['path']} | {d['status'].replace('|', '/')} |" for d in dropped]
    (folder / "SOURCES.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _counts(images: dict[str, dict]) -> dict:
    def tally(values) -> dict:
        out: dict[str, int] = {}
        for value in values:
            out[value] = out.get(value, 0) + 1
        return dict(sorted(out.items()))

    queries = [m for m in images.values() if m["role"] == "query"]
    distractors = [m for m in images.values() if m["role"] == "distractor"]
    return {"queries": len(queries), "queries_per_edit": tally(m["edit"] for m in queries),
            "distractors": len(distractors), "distractors_per_kind": tally(m["distractor_kind"] for m in distractors),
            "distractors_per_edit": tally(m["edit"] or "none" for m in distractors), "images": len(images)}


def build(out_dir, *, groups: int | None = None, distractors: int | None = None, seed: int = 0, quick: bool = False,
          link: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Build the set under ``out_dir`` (empty or absent) and return its manifest (also written as manifest.json).

    ``groups`` (default 60, or 12 with ``quick``), ``distractors`` (default 500, or 100 with ``quick``); ``quick``
    also uses only the JPEG wallpapers; ``link``: hard-link the copy-detection files to the all-vs-all ones.
    """
    import augly as augly_package
    import PIL
    import skimage

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    n_groups = groups if groups is not None else (QUICK_GROUPS if quick else DEFAULT_GROUPS)
    n_distractors = distractors if distractors is not None else (QUICK_DISTRACTORS if quick else DEFAULT_DISTRACTORS)
    if n_groups < 1 or n_distractors < 0:
        raise ValueError("groups must be >= 1 and distractors >= 0")
    say = log or (lambda message: None)
    sources, dropped = load_sources(quick)
    say(f"{len(sources)} sources kept, {len(dropped)} left out")
    eligible = [s for s in sources if s.role == "photo"]
    if n_groups > len(eligible) - MIN_RESERVED_SOURCES:
        raise ValueError(f"{n_groups} groups asked for, but only {len(eligible)} detailed sources were found (at most "
                         f"{len(eligible) - MIN_RESERVED_SOURCES} can be groups); are the wallpaper packages installed?")
    order = [int(i) for i in np.random.default_rng([seed, 0]).permutation(len(eligible))]
    group_sources = [eligible[i] for i in order[:n_groups]]
    extras = [s for s in sources if s.role == "extra"]
    pool = [eligible[i] for i in order[n_groups:]] + [s for s in extras if s.package != "scikit-image"]
    group_keys = {s.key for s in group_sources}
    for source in sources:
        source.status = "group" if source.key in group_keys else "distractor"
    writer = _Writer(out, link)
    names, originals = _write_groups(writer, group_sources, seed)
    say(f"{len(names)} groups written")
    _write_distractors(writer, n_distractors, pool, [s for s in extras if s.package == "scikit-image"], names,
                       originals, seed)
    say(f"{n_distractors} distractors written")
    used = [s for s in sources if s.status == "group"] + [s for s in sources if s.status == "distractor"]
    write_licences(out, used, dropped)
    manifest = {
        "name": "offline copy-detection set (DISC21-style)", "builder": "bench/copy_detection.py", "seed": seed,
        "quick": quick,
        "settings": {"max_side": MAX_SIDE, "jpeg_quality": JPEG_QUALITY, "edits_per_group": EDITS_PER_GROUP,
                     "distractor_edit_rate": DISTRACTOR_EDIT_RATE},
        "versions": {"numpy": np.__version__, "pillow": PIL.__version__, "scikit-image": skimage.__version__,
                     "augly": getattr(augly_package, "__version__", "1.0.0"),
                     **{p: package_version(p) for p in (*WALLPAPER_PACKAGES, FASHION_PACKAGE)}},
        "protocols": {
            "all": "all/<group>/*.jpg: every group member is a query, relevant to the rest of its group; "
                   "all/_distractors/*.jpg are never queries and never relevant",
            "copy_detection": "queries/<group>/<edit>.jpg against the database references/<group>/original.jpg + "
                              "references/_distractors/*.jpg; each query is relevant to its group's original only",
        },
        "edit_types": list(EDIT_TYPES),
        "counts": {"groups": len(names), **_counts(writer.images), "files": len(writer.files)},
        "groups": names,
        "sources": [s.record() for s in used],
        "sources_left_out": dropped,
        "files": writer.files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the offline DISC21-style copy-detection set.")
    parser.add_argument("out", type=Path, help="output folder (empty or absent)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_GROUPS} groups, {QUICK_DISTRACTORS} distractors, JPEG sources")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--groups", type=int, help=f"default {DEFAULT_GROUPS} ({QUICK_GROUPS} with --quick)")
    parser.add_argument("--distractors", type=int, help=f"default {DEFAULT_DISTRACTORS} ({QUICK_DISTRACTORS} with --quick)")
    parser.add_argument("--copy", action="store_true", help="copy instead of hard-linking the second protocol's files")
    parser.add_argument("--probe-augly", action="store_true", help="only list which AugLy image functions run here")
    args = parser.parse_args(argv)
    if args.probe_augly:
        for name, status in probe_augly().items():
            print(f"{name:32s} {status}")
        return 0
    started = time.perf_counter()
    manifest = build(args.out, groups=args.groups, distractors=args.distractors, seed=args.seed, quick=args.quick,
                     link=not args.copy, log=lambda m: print(f"[{time.perf_counter() - started:6.1f} s] {m}", file=sys.stderr))
    counts = manifest["counts"]
    print(f"{counts['groups']} groups, {counts['queries']} queries, {counts['distractors']} distractors, "
          f"{counts['files']} files in {time.perf_counter() - started:.1f} s under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
