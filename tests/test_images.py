import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DEMO_DATABASE, write_rgb
from retrieval import images
from retrieval.errors import ImageError


HEIC_PHOTO = Path(__file__).with_name("rotated-coffee.heic")  # the demo coffee photo (CC0) at 120 x 80, stored turned


def test_list_image_files_recursive_case_insensitive_sorted(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name in ["z.JPG", "a.png", "b/deep/é x.WebP", "b/c.tiff", "notes.txt", ".hidden/x.jpg", ".dot.jpg", "b/d.Jpeg"]:
        (tmp_path / name).write_bytes(b"x")
    assert images.list_image_files(tmp_path) == ["a.png", "b/c.tiff", "b/d.Jpeg", "b/deep/é x.WebP", "z.JPG"]


def test_decodes_file_and_bytes_the_same(tmp_path):
    path = write_rgb(tmp_path / "x.png")
    from_file = images.open_image(path)
    from_bytes = images.open_image(path.read_bytes())
    assert from_file.mode == "RGB" and from_file.size == (64, 48)
    np.testing.assert_array_equal(np.asarray(from_file), np.asarray(from_bytes))


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt|not an image"),
    ],
)
def test_bad_files_raise_one_line_errors(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason) as caught:
        images.open_image(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        images.open_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        images.open_image(tmp_path)
    with pytest.raises(ImageError, match="empty image data"):
        images.open_image(b"")


def test_truncated_jpeg_is_refused(tmp_path):
    good = write_rgb(tmp_path / "good.jpg", size=(300, 200))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        images.open_image(cut)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(bomb)  # 400 megapixels in a few kilobytes
    assert bomb.stat().st_size < 200_000
    with pytest.raises(ImageError, match="decompression bomb"):
        images.open_image(bomb)


def test_exif_orientation_is_applied(tmp_path):
    picture = Image.new("RGB", (80, 40), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    path = tmp_path / "rotated.jpg"
    picture.save(path, exif=exif)
    assert images.open_image(path).size == (40, 80)


def test_heic_and_avif_photos_are_found_and_decoded(tmp_path):
    """A phone's HEIC photo (``HEIC_PHOTO``: written by pillow-heif with EXIF orientation 6, which it stores as a HEIF
    rotation) and an AVIF file are image files, decoded upright once, like the JPEG they came from; a truncated HEIC is
    one error line."""
    for name in ("a.HEIC", "b.heif", "c.avif", "d.txt"):
        (tmp_path / name).write_bytes(b"")
    assert images.list_image_files(tmp_path) == ["a.HEIC", "b.heif", "c.avif"]
    original = Image.open(DEMO_DATABASE / "coffee" / "original.jpg").convert("RGB")
    original.thumbnail((120, 120))
    upright = np.asarray(original.transpose(Image.Transpose.ROTATE_270), np.float32)
    decoded = images.open_image(HEIC_PHOTO)
    assert decoded.mode == "RGB" and decoded.size == (80, 120) and decoded.info["source_size"] == (80, 120)
    assert np.abs(np.asarray(decoded, np.float32) - upright).mean() < 8  # the same picture, turned once
    original.save(tmp_path / "photo.avif", quality=80)
    assert images.open_image((tmp_path / "photo.avif").read_bytes()).size == original.size
    with pytest.raises(ImageError, match="not an image or unsupported format"):
        images.open_image(HEIC_PHOTO.read_bytes()[:1000])


def test_image_format_reads_the_header_only(tmp_path):
    """The format a file's bytes hold, without decoding them (the web app's ``/image`` route sends a browser the formats
    it shows as they are): HEIC's too in a process that has decoded nothing yet; no image or a bomb is ImageError."""
    import subprocess
    import sys

    from conftest import REPO

    assert images.image_format(HEIC_PHOTO.read_bytes()) == "HEIF"
    assert images.image_format((DEMO_DATABASE / "coffee" / "original.jpg").read_bytes()) == "JPEG"
    fresh = subprocess.run(
        [sys.executable, "-c", "import sys; from retrieval.images import image_format; "
                               "print(image_format(open(sys.argv[1], 'rb').read()))", str(HEIC_PHOTO)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert fresh.stdout.strip() == "HEIF", fresh.stderr
    with pytest.raises(ImageError, match="not an image"):
        images.image_format(b"GIF89a but not really")
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, "PNG")
    with pytest.raises(ImageError, match="too many pixels") as refused:
        images.image_format(bomb.getvalue())
    assert refused.value.kind == "too_large"


def test_source_size_is_the_displayed_full_resolution_even_after_a_jpeg_draft(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "big-rotated.jpg"
    Image.new("RGB", (1600, 900), "blue").save(path, exif=exif)
    opened = images.open_image(path, draft_size=224)
    assert max(opened.size) < 1600  # the decoder scaled it down in the DCT
    assert opened.info["source_size"] == (900, 1600)
    array, size = images.load_sized_for_backbone(path, 224)
    assert array.shape == (224, 224, 3) and size == (900, 1600)
    png = tmp_path / "plain.png"
    Image.new("LA", (33, 17)).save(png)
    assert images.load_sized_for_backbone(png, 64, "aspect-bicubic")[1] == (33, 17)


def picture_in_mode(mode: str) -> Image.Image:
    """A 12x10 picture stored in ``mode``; the 16/32-bit ones with values far outside 0..255."""
    ramp = np.arange(120).reshape(10, 12)
    if mode == "I;16":
        return Image.fromarray((ramp * 500).astype(np.uint16))
    if mode == "I":
        return Image.fromarray((ramp * 100_000).astype(np.int32))
    if mode == "F":
        return Image.fromarray(np.linspace(-1, 1, 120, dtype=np.float32).reshape(10, 12))
    rgb = np.random.default_rng(1).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    return Image.fromarray(rgb).convert(mode)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(mode):
    source = picture_in_mode(mode)
    assert source.mode == mode
    out = images._to_rgb(source)
    assert out.mode == "RGB" and out.size == (12, 10)
    values = np.asarray(out)
    if mode in ("I;16", "I", "F"):  # rescaled to the full 8-bit range, not clipped to white
        assert values.min() == 0 and values.max() == 255


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert images._to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ("blue", "yellow")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    first = images.open_image(path)
    assert first.getpixel((0, 0))[2] > 200  # blue


def test_resize_rules():
    picture = Image.new("RGB", (300, 100), "green")
    out = images.resize_for_backbone(picture, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert images.resize_for_backbone(picture, 32, "squash-nearest").shape == (32, 32, 3)
    assert images.resize_for_backbone(picture, 224, "aspect-bicubic").shape == (75, 224, 3)
    assert images.resize_for_backbone(Image.new("RGB", (2000, 10)), 224, "aspect-bicubic").shape == (32, 224, 3)
    with pytest.raises(ValueError, match="unknown resize rule"):
        images.resize_for_backbone(picture, 32, "stretch")


def test_load_for_backbone_uses_jpeg_draft_but_keeps_quality(tmp_path):
    big = Image.fromarray(np.random.default_rng(2).integers(0, 255, (1200, 1600, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=95)
    fast = images.load_for_backbone(buffer.getvalue(), 224).astype(float)
    exact = images.resize_for_backbone(big, 224).astype(float)
    assert fast.shape == (224, 224, 3)
    assert np.abs(fast.mean() - exact.mean()) < 3


def test_prefetched_batches_keep_order_bound_the_window_and_turn_image_errors_into_entries():
    import threading

    started, lock = [], threading.Lock()

    def load(n):
        with lock:
            started.append(n)
        if n % 4 == 3:
            raise ImageError(f"bad {n}")
        return n * 10

    seen = []
    for start, results in images.prefetched_batches(list(range(11)), load, batch_size=2, workers=2):
        assert max(started) < start + 2 * 4  # never more than three batches ahead of the one handed out
        seen.append((start, [(value, str(error) if error else None) for value, error in results]))
    assert [start for start, _ in seen] == [0, 2, 4, 6, 8, 10]
    flat = [entry for _, batch in seen for entry in batch]
    assert flat == [(None, f"bad {n}") if n % 4 == 3 else (n * 10, None) for n in range(11)]
    with pytest.raises(ValueError, match="at least 1"):
        next(images.prefetched_batches([1], load, batch_size=0))


def test_prefetched_batches_let_other_errors_through():
    def load(n):
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(images.prefetched_batches([1, 2], load, batch_size=1))
