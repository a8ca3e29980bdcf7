"""Image decoding: mode conversions, EXIF orientation, broken files, box cropping, drafted JPEG decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from carsml.data.images import crop_to_box, image_size, load_crop, open_rgb, read_header
from carsml.errors import ConfigError, DataError

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stanford_cars" / "sample"


def _pixel(img: Image.Image, xy: tuple[int, int] = (1, 1)) -> tuple[int, int, int]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def _close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 3) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


def test_gray_l_becomes_rgb(tmp_path: Path) -> None:
    p = tmp_path / "gray.png"
    Image.new("L", (8, 6), 90).save(p)
    img = open_rgb(p)
    assert img.size == (8, 6) and _pixel(img) == (90, 90, 90)


def test_rgba_alpha_is_composited_on_white(tmp_path: Path) -> None:
    p = tmp_path / "rgba.png"
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    im.paste((0, 0, 255, 255), (4, 0, 8, 8))  # opaque blue right half
    im.save(p)
    img = open_rgb(p)
    assert _pixel(img, (1, 1)) == (255, 255, 255)
    assert _pixel(img, (6, 1)) == (0, 0, 255)


def test_la_half_transparent_blends_with_white(tmp_path: Path) -> None:
    p = tmp_path / "la.png"
    Image.new("LA", (4, 4), (0, 128)).save(p)
    assert _close(_pixel(open_rgb(p)), (127, 127, 127), tol=2)


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    plain = tmp_path / "p.png"
    im = Image.new("P", (6, 6), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    im.save(plain)
    assert Image.open(plain).mode == "P"
    assert _pixel(open_rgb(plain)) == (10, 200, 30)

    transparent = tmp_path / "pt.gif"
    im = Image.new("P", (6, 6), 1)
    im.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    im.info["transparency"] = 1
    im.save(transparent, transparency=1)
    assert _pixel(open_rgb(transparent)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, quality=95)  # pure red in CMYK
    assert Image.open(p).mode == "CMYK"
    assert _close(_pixel(open_rgb(p)), (255, 0, 0), tol=6)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    p = tmp_path / "g16.png"
    values = np.array([[0, 257 * 64], [257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(p)
    assert Image.open(p).mode in ("I;16", "I")
    img = open_rgb(p)
    assert [img.getpixel(xy)[0] for xy in ((0, 0), (1, 0), (0, 1), (1, 1))] == [0, 64, 128, 255]


def test_int32_and_float_modes(tmp_path: Path) -> None:
    i32 = tmp_path / "i.tif"
    Image.new("I", (4, 4), 257 * 100).save(i32)
    assert Image.open(i32).mode == "I"
    assert _pixel(open_rgb(i32)) == (100, 100, 100)
    f32 = tmp_path / "f.tif"
    Image.fromarray(np.full((4, 4), 300.0, dtype=np.float32), mode="F").save(f32)
    assert _pixel(open_rgb(f32)) == (255, 255, 255)


def _exif_rotated_jpeg(path: Path) -> None:
    """Stored 40x20 with the left half red and the right half blue; EXIF orientation 6 (rotate 90 clockwise
    to display), so it shows as 20x40 with red on top."""
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, exif=exif, quality=95)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    p = tmp_path / "rot.jpg"
    _exif_rotated_jpeg(p)
    img = open_rgb(p)
    assert img.size == (20, 40)
    assert image_size(p) == (20, 40)
    assert _close(_pixel(img, (10, 5)), (255, 0, 0), tol=8)
    assert _close(_pixel(img, (10, 35)), (0, 0, 255), tol=8)


def test_truncated_jpeg_raises_naming_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    full = tmp_path / "full.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, quality=90)
    cut = tmp_path / "cut.jpg"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    for call in (lambda: open_rgb(cut), lambda: load_crop(cut, (0, 0, 32, 32), 16)):
        with pytest.raises(DataError, match="cut.jpg.*(truncated|corrupt)"):
            call()


def test_non_image_and_missing_files_raise_naming_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(DataError, match="notes.jpg: not a recognised image"):
        open_rgb(text)
    with pytest.raises(DataError, match="notes.jpg"):
        image_size(text)
    with pytest.raises(DataError, match="not found: .*nope.jpg"):
        open_rgb(tmp_path / "nope.jpg")


def test_read_header_reports_mode_without_decoding(tmp_path: Path) -> None:
    p = tmp_path / "gray.jpg"
    Image.new("L", (30, 12), 5).save(p)
    assert tuple(read_header(p)) == (30, 12, "L", "JPEG")


def test_crop_clips_box_past_the_edge() -> None:
    img = Image.new("RGB", (50, 40))
    assert crop_to_box(img, (10, 5, 80, 60)).size == (40, 35)
    assert crop_to_box(img, (-5, -5, 10, 10)).size == (10, 10)
    # margin 0.5 grows a 10x10 box by 5 px per side, then clips at the left/top edge
    assert crop_to_box(img, (2, 20, 12, 30), margin=0.5).size == (17, 20)


def test_crop_rejects_empty_outside_boxes_and_bad_margin() -> None:
    img = Image.new("RGB", (50, 40))
    with pytest.raises(DataError, match="outside the 50x40 image"):
        crop_to_box(img, (60, 0, 70, 10))
    with pytest.raises(DataError, match="is empty"):
        crop_to_box(img, (10, 10, 10, 20))
    with pytest.raises(ConfigError, match="margin"):
        crop_to_box(img, (0, 0, 10, 10), margin=-0.1)


def _target_jpeg(path: Path, size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    """A blue JPEG with a red rectangle exactly at `box`."""
    im = Image.new("RGB", size, (0, 0, 255))
    im.paste((255, 0, 0), box)
    im.save(path, quality=95)


def test_load_crop_drafts_big_jpegs_and_rescales_the_box(tmp_path: Path, monkeypatch) -> None:
    p = tmp_path / "big.jpg"
    box = (400, 240, 720, 560)  # 320x320 red square in an 800x600 image
    _target_jpeg(p, (800, 600), box)
    scales = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        scales.append(self.decoderconfig[0])
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out = load_crop(p, box, 32)
    assert scales == [8]  # 320 px / 8 = 40 >= 32
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # The whole crop is the red square: a box not rescaled to the drafted image would show blue.
    assert out[..., 0].min() > 200 and out[..., 2].max() < 60

    reference = np.asarray(crop_to_box(open_rgb(p), box).resize((32, 32), Image.Resampling.BILINEAR))
    assert np.abs(out.astype(int) - reference.astype(int)).mean() < 4


def test_load_crop_margin_whole_image_and_exif(tmp_path: Path) -> None:
    p = tmp_path / "small.jpg"
    _target_jpeg(p, (64, 48), (16, 12, 48, 36))
    whole = load_crop(p, None, 16)
    assert whole.shape == (16, 16, 3)
    assert whole[0, 0, 2] > 200 and whole[8, 8, 0] > 200  # blue corner, red centre
    grown = load_crop(p, (16, 12, 48, 36), 16, margin=0.25)  # the margin brings blue in at the corners
    assert grown[0, 0, 2] > 150 and grown[8, 8, 0] > 200

    rotated = tmp_path / "rot.jpg"
    _exif_rotated_jpeg(rotated)
    top = load_crop(rotated, (0, 0, 20, 20), 8)  # displayed frame: red on top
    assert top[..., 0].mean() > 200 and top[..., 2].mean() < 60


def test_load_crop_rejects_bad_size_and_names_file_for_outside_box(tmp_path: Path) -> None:
    p = tmp_path / "small.jpg"
    _target_jpeg(p, (64, 48), (16, 12, 48, 36))
    with pytest.raises(ConfigError, match="image size 0"):
        load_crop(p, (0, 0, 8, 8), 0)
    with pytest.raises(DataError, match="small.jpg.*outside the 64x48 image"):
        load_crop(p, (100, 100, 120, 120), 8)


def test_load_crop_real_sample_with_box_past_the_edge() -> None:
    """07389.jpg: its devkit box runs past the original image; the sample is the clipped crop, 520 px wide."""
    p = SAMPLE / "cars_train_bbox_cropped" / "07389.jpg"
    width, height = image_size(p)
    out = load_crop(p, (0, 0, width + 141, height), 24)
    assert out.shape == (24, 24, 3)
    assert np.array_equal(out, load_crop(p, (0, 0, width, height), 24))
