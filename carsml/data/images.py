"""Image decoding: open any image as RGB, crop it to a box, resize it; errors are DataErrors naming the file.

Boxes are 0-based `(x1, y1, x2, y2)` with x2/y2 exclusive (a PIL crop box), in the coordinates of the image as
displayed, i.e. after its EXIF orientation is applied. `image_size` reports sizes in the same frame, so boxes
built from it (class_folders) and the crops made here agree.

Multi-frame files (animated GIF / WebP / PNG, multi-page TIFF, MPO) are read as their first frame, explicitly: the
frame image viewers show first. Sizes are the first frame's too. Zero-byte files fail with a DataError naming the file.

This is the one decoder of the project: the training cache (`load_crop`, on files) and the serving adapter
(`carsml.tracking.pyfunc_model`, on request bytes) both run `plan_crop` + `finish_crop` on a lazily opened image, so a
served model sees exactly the pixels its evaluation images had (mode conversion, orientation, crop, draft, resize).
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from carsml.errors import ConfigError, DataError

_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the image upright (as in PIL.ImageOps.exif_transpose).
_ORIENTATION_OPS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {5, 6, 7, 8}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
# What PIL raises on damaged files besides OSError (bad PNG chunks, broken headers, zlib streams...).
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError,
)


class ImageHeader(NamedTuple):
    """What the header of an image file says, without decoding the pixels."""

    width: int  # after EXIF orientation
    height: int
    mode: str  # PIL mode of the stored pixels ("RGB", "L", "CMYK", ...)
    format: str  # PIL format name ("JPEG", "PNG", ...)


def _open_lazy(path: Path) -> Image.Image:
    """Open the file and parse its header only; the caller closes the image."""
    if not path.is_file():
        raise DataError(f"Image file not found: {path}")
    try:
        empty = path.stat().st_size == 0
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if empty:
        raise DataError(f"{path}: the file is empty (0 bytes); expected an image (JPEG, PNG, BMP, GIF, WebP or TIFF). "
                        f"Was its download or copy interrupted?")
    try:
        return Image.open(path)
    except UnidentifiedImageError as exc:
        raise DataError(
            f"{path}: not a recognised image file (expected JPEG, PNG, BMP, GIF, WebP or TIFF)"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise DataError(f"{path}: cannot read the image header ({exc})") from exc


def _orientation(img: Image.Image) -> int:
    """EXIF orientation 1..8; 1 when absent or unreadable. A broken EXIF block does not make the pixels
    unusable, and image viewers ignore it the same way."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except _DECODE_ERRORS:
        return 1
    return value if value in _ORIENTATION_OPS else 1


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of a lazily opened image as displayed (EXIF orientation applied), at full scale.

    Reads the header only, except for a PNG whose EXIF follows its pixel data (`orientation_needs_decode`)."""
    width, height = img.size
    return (height, width) if _orientation(img) in _SWAPS_AXES else (width, height)


def orientation_needs_decode(img: Image.Image) -> bool:
    """Whether reading the EXIF orientation of a lazily opened image decodes its pixels: PIL finds the EXIF of a PNG
    by reading the whole file unless an eXIf chunk came before the pixel data (JPEG EXIF is always in the header)."""
    return img.format == "PNG" and "exif" not in img.info


def read_header(path: str | Path) -> ImageHeader:
    """Size (EXIF orientation applied), mode and format of an image file without decoding its pixels."""
    path = Path(path)
    img = _open_lazy(path)
    try:
        return ImageHeader(*oriented_size(img), img.mode, img.format or "")
    finally:
        img.close()


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the header only."""
    header = read_header(path)
    return header.width, header.height


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) gray -> 8-bit gray, scaling 0..65535 to 0..255. PIL's own convert clips
    instead, which turns most 16-bit images white."""
    values = np.asarray(img).astype(np.float64)
    return Image.fromarray(np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image, path: str | Path) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white (cut-out shots keep a clean background)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_l(img).convert("RGB")
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.rint(np.clip(values, 0, 255)).astype(np.uint8), mode="L").convert("RGB")
    try:
        return img.convert("RGB")  # L, P, 1, CMYK, YCbCr, RGBX, ...
    except ValueError as exc:
        raise DataError(f"{path}: image mode {mode!r} cannot be converted to RGB") from exc


def _decode(img: Image.Image, path: str | Path) -> Image.Image:
    """Fully decode a lazily opened image, orient it upright and convert it to RGB."""
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)  # a multi-frame file: its first frame (see the module docstring)
        img.load()  # the whole decode, so a truncated file fails here and not later in a worker
        op = _ORIENTATION_OPS.get(_orientation(img))
        oriented = img.transpose(op) if op is not None else img
        return _to_rgb(oriented, path)
    except DataError:
        raise
    except _DECODE_ERRORS as exc:
        raise DataError(f"{path}: corrupt or truncated image ({exc})") from exc


def open_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB.

    Applies the EXIF orientation; converts L/LA/P/PA/RGBA/CMYK/I;16/I/F to RGB (alpha composited on white,
    16-bit scaled to 8-bit). Raises DataError naming the file for missing, corrupt or truncated files.
    """
    path = Path(path)
    img = _open_lazy(path)
    try:
        rgb = _decode(img, path)
        # Detach the result from the file: close() below invalidates `img` itself when nothing was converted.
        return rgb.copy() if rgb is img else rgb
    finally:
        img.close()


def _grow_and_clip(
    box: tuple[int, int, int, int], margin: float, width: int, height: int, where: str = ""
) -> tuple[int, int, int, int]:
    """Grow a 0-based exclusive box by `margin` of its size per side and clip it to a width x height image."""
    prefix = f"{where}: " if where else ""
    x1, y1, x2, y2 = (int(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        raise DataError(
            f"{prefix}box {(x1, y1, x2, y2)} is empty; expected x1 < x2 and y1 < y2 (x2, y2 exclusive)"
        )
    if not margin >= 0:  # also rejects NaN
        raise ConfigError(f"crop margin {margin} is invalid; expected a fraction >= 0 of the box size")
    dx, dy = margin * (x2 - x1), margin * (y2 - y1)
    gx1, gy1 = max(0, math.floor(x1 - dx)), max(0, math.floor(y1 - dy))
    gx2, gy2 = min(width, math.ceil(x2 + dx)), min(height, math.ceil(y2 + dy))
    if gx2 <= gx1 or gy2 <= gy1:
        raise DataError(f"{prefix}box {(x1, y1, x2, y2)} lies outside the {width}x{height} image")
    return gx1, gy1, gx2, gy2


def box_region(
    img: Image.Image, box: tuple[int, int, int, int], margin: float = 0.0, where: str = ""
) -> tuple[int, int, int, int]:
    """The region of a lazily opened image that `box` (0-based, x2/y2 exclusive, displayed frame) grown by `margin`
    crops: clipped to the image; DataError naming `where` for an empty box or one wholly outside the image."""
    return _grow_and_clip(box, margin, *oriented_size(img), where)


def crop_to_box(img: Image.Image, box: tuple[int, int, int, int], margin: float = 0.0) -> Image.Image:
    """Crop to a 0-based (x1, y1, x2, y2 exclusive) box grown by `margin` (fraction of the box size per side),
    clipped to the image (PIL alone would pad the outside with black)."""
    return img.crop(_grow_and_clip(box, margin, img.width, img.height))


class CropPlan(NamedTuple):
    """How `finish_crop` turns an opened image into its crop."""

    region: tuple[int, int, int, int] | None  # 0-based x1, y1, x2, y2 (exclusive), displayed frame; None: all of it
    scale: float  # how many full-scale pixels one decoded pixel covers (JPEG draft: 1, 2, 4 or 8)
    raw_size: tuple[int, int]  # width, height as stored, at full scale


def plan_crop(
    img: Image.Image, box: tuple[int, int, int, int] | None, size: int, margin: float = 0.0, where: str = ""
) -> CropPlan:
    """Plan the decode of a lazily opened image (header parsed, pixels not read) into a size x size crop of `box`
    (None = whole image), grown by `margin`.

    A JPEG whose crop is at least twice `size` is set to decode at a reduced DCT scale (PIL draft: 1/2, 1/4 or 1/8)
    that keeps the crop's short side >= `size`; afterwards `img.size` is the size that will be decoded. Without a box
    nothing is read beyond the header (PIL reads a whole PNG to find its EXIF; a box needs the orientation first).
    `where` names the image in errors.
    """
    raw_w, raw_h = img.size
    region = None
    short_side = min(raw_w, raw_h)
    if box is not None:
        region = box_region(img, box, margin, where)
        short_side = min(region[2] - region[0], region[3] - region[1])
    scale = 1.0
    if img.format == "JPEG" and short_side >= 2 * size:
        # A raw size at which the crop's short side is still >= size; draft picks the largest DCT
        # reduction that keeps the image at least that big, the same factor on both axes.
        wanted = (math.ceil(raw_w * size / short_side), math.ceil(raw_h * size / short_side))
        drafted = img.draft(None, wanted)
        if drafted is not None:
            scale = raw_w / drafted[1][2]
    return CropPlan(region, scale, (raw_w, raw_h))


def finish_crop(img: Image.Image, plan: CropPlan, size: int, where: str | Path = "") -> np.ndarray:
    """Decode an image planned by `plan_crop`: RGB, upright, cropped, resized to size x size (bilinear,
    antialiased); uint8 HxWx3. Raises DataError naming `where` for corrupt or truncated pixels."""
    rgb = _decode(img, where)
    region = plan.region
    if region is None:  # the whole image, upright (its orientation is known now that it is decoded)
        raw_w, raw_h = plan.raw_size
        region = (0, 0, raw_h, raw_w) if _orientation(img) in _SWAPS_AXES else (0, 0, raw_w, raw_h)
    limits = (rgb.width, rgb.height, rgb.width, rgb.height)
    scaled = tuple(min(v / plan.scale, limit) for v, limit in zip(region, limits, strict=True))
    out = rgb.resize((size, size), Image.Resampling.BILINEAR, box=scaled)
    return np.asarray(out, dtype=np.uint8)


def load_crop(
    path: str | Path, box: tuple[int, int, int, int] | None, size: int, margin: float = 0.0
) -> np.ndarray:
    """Decode, RGB, crop to `box` (None = whole image), resize to size x size (bilinear, antialiased).

    Returns uint8 HxWx3. JPEGs whose crop is at least twice `size` are decoded at a reduced DCT scale (PIL
    draft: 1/2, 1/4 or 1/8) that keeps the crop's short side >= `size`; the box is rescaled to match
    (`plan_crop` + `finish_crop`, which the serving adapter runs on request bytes with the model's box policy).
    """
    if size < 1:
        raise ConfigError(f"image size {size} is invalid; expected a positive number of pixels")
    path = Path(path)
    img = _open_lazy(path)
    try:
        return finish_crop(img, plan_crop(img, box, size, margin, str(path)), size, path)
    finally:
        img.close()
