"""The per-sample batch augmentation kernels behind `carsml.data.transforms`.

Random draws from an optional `torch.Generator` (made on the generator's device, so a seeded generator gives the same
parameters on any device), 3×3 geometry matrices and the single-resampling warp (`_warp`: one `F.affine_grid` +
`F.grid_sample` per batch, supersampled when shrinking), per-sample colour ops, and the building blocks of the
"strong" policy: torchvision-style RandomResizedCrop, TrivialAugmentWide and RandomErasing, each drawing its own
parameters for every sample of a float N×C×H×W batch in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

# RandomResizedCrop, RandomErasing and TrivialAugmentWide (the "strong" policy)
CROP_SCALE = (0.35, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
ERASE_P = 0.25
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)
TA_BINS = 31
# TrivialAugmentWide translates up to 32 px at its reference size of 224; scale it with the image so the
# augmentation means the same thing at any cache resolution.
TA_MAX_TRANSLATE_FRACTION = 32.0 / 224.0
TA_OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
MAX_SUPERSAMPLING = 4  # geometric policies shrinking a larger cached image sample up to 4 x 4 points per pixel
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision uses


# ---------------------------------------------------------------------------------------------- random draws
def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) draws made on the generator's device (CPU without one), then moved to `device`.

    Drawing on the generator's device makes a seeded generator give the same parameters whatever device the
    images live on.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _randint(
    high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(high, shape, generator=generator, device=gen_device).to(device)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return lo + (hi - lo) * _rand((n,), generator, device)


# ---------------------------------------------------------------------------------------------- geometry
def _eye(n: int, device: torch.device) -> Tensor:
    return torch.eye(3, device=device).expand(n, 3, 3).clone()


def _rotation(angle_rad: Tensor) -> Tensor:
    """(n, 3, 3) rotations about the image centre in pixel coordinates."""
    m = _eye(angle_rad.shape[0], angle_rad.device)
    cos, sin = torch.cos(angle_rad), torch.sin(angle_rad)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, -sin, sin, cos
    return m


def _hflip(flip: Tensor) -> Tensor:
    m = _eye(flip.shape[0], flip.device)
    m[:, 0, 0] = 1.0 - 2.0 * flip.float()
    return m


def _warp(x: Tensor, out_to_in: Tensor, size: int | None = None) -> Tensor:
    """Resample `x` (float N×C×H×W) into N×C×size×size (None: the input's size): output pixel p shows input pixel
    `out_to_in @ p`.

    Matrices act on homogeneous pixel coordinates centred on the image (x right, y down), in the input's pixel units:
    the output spans the same extent whatever its size, so a crop matrix means the same region at any output size.
    Rotations and shears are true ones on non-square images; they are converted to the normalised [-1, 1] coordinates
    that `affine_grid` expects. Pixels mapped from outside the image are filled with 0 (black), like
    torchvision's default fill.
    """
    n, _, h, w = x.shape
    out_h, out_w = (size, size) if size else (h, w)
    # Shrinking a larger image: sample a `ss` times finer grid and average each ss x ss block (supersampling), an
    # antialiasing filter that bilinear sampling alone lacks (a 1.5x smaller crop would otherwise alias).
    ss = min(math.ceil(max(h / out_h, w / out_w)), MAX_SUPERSAMPLING)
    scale = torch.diag(torch.tensor([w / 2.0, h / 2.0, 1.0], device=x.device, dtype=out_to_in.dtype))
    inv_scale = torch.diag(torch.tensor([2.0 / w, 2.0 / h, 1.0], device=x.device, dtype=out_to_in.dtype))
    theta = (inv_scale @ out_to_in @ scale)[:, :2, :].to(x.dtype)
    grid = F.affine_grid(theta, [n, x.shape[1], out_h * ss, out_w * ss], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.avg_pool2d(out, ss) if ss > 1 else out


# ---------------------------------------------------------------------------------------------- colour ops
def _per_sample(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def _grayscale(x: Tensor) -> Tensor:
    r, g, b = x.unbind(dim=1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1]; factor 1 leaves `x` unchanged."""
    f = _per_sample(factor)
    return (f * x + (1.0 - f) * other).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Per-sample brightness: blend with black."""
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Per-sample contrast: blend with the image's mean grey level."""
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Per-sample saturation ("Color" in AutoAugment): blend with the greyscale image."""
    return _blend(x, _grayscale(x), factor)


def adjust_sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """Per-sample sharpness: blend with a 3×3 smoothed image whose border pixels are the original ones."""
    # The kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 written as (9 * 3×3 mean + 4 * centre) / 13: a 3×3
    # average pool is far faster than a depthwise convolution on CPU.
    blurred = x.clone()
    blurred[..., 1:-1, 1:-1] = (9.0 * F.avg_pool2d(x, 3, stride=1) + 4.0 * x[..., 1:-1, 1:-1]) / 13.0
    return _blend(x, blurred, factor)


def _to_uint8(x: Tensor) -> Tensor:
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the top `bits` (per sample, 1–8) bits of each 8-bit channel value."""
    mask = ((255 << (8 - bits.long())) & 255).to(torch.uint8)
    return (_to_uint8(x) & _per_sample(mask)).float() / 255.0


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """Invert the values >= the per-sample threshold (a threshold above 1 leaves the image unchanged)."""
    return torch.where(x >= _per_sample(threshold), 1.0 - x, x)


def autocontrast(x: Tensor) -> Tensor:
    """Stretch each channel of each image to the full [0, 1] range (flat channels are left unchanged)."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    flat = hi <= lo
    scale = torch.where(flat, torch.ones_like(hi), 1.0 / (hi - lo).clamp_min(1e-12))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return ((x - lo) * scale).clamp_(0.0, 1.0)


def equalize(x: Tensor) -> Tensor:
    """Histogram-equalise each channel of each image (torchvision's batched uint8 implementation)."""
    return TF.equalize(_to_uint8(x)).float() / 255.0


# ---------------------------------------------------------------------------------------------- strong policy
def _random_resized_crop(
    n: int, h: int, w: int, generator: torch.Generator | None, device: torch.device, tries: int = 10,
    scale: tuple[float, float] = CROP_SCALE,
) -> Tensor:
    """(n, 3, 3) output→input maps of torchvision's RandomResizedCrop, one crop per sample.

    Like torchvision: up to `tries` (area, log-aspect) draws per sample, the first that fits wins, and a
    sample where none fits falls back to the largest centred crop with an allowed aspect ratio.
    """
    area = h * w * _uniform(n * tries, *scale, generator, device).view(n, tries)
    log_ratio = _uniform(n * tries, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator, device)
    ratio = torch.exp(log_ratio).view(n, tries)
    cw, ch = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
    fits = (cw <= w) & (ch <= h)
    first = fits.float().argmax(dim=1, keepdim=True)  # index of the first fitting try (0 when none fits)
    cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
    none_fit = ~fits.any(dim=1)
    in_ratio = w / h
    fb_w = float(w) if in_ratio <= CROP_RATIO[1] else h * CROP_RATIO[1]
    fb_h = float(h) if in_ratio >= CROP_RATIO[0] else w / CROP_RATIO[0]
    cw = torch.where(none_fit, torch.full_like(cw, fb_w), cw)
    ch = torch.where(none_fit, torch.full_like(ch, fb_h), ch)
    # Top-left corner uniform over the valid range; centred for the fallback.
    x0 = torch.where(none_fit, (w - cw) / 2, _rand((n,), generator, device) * (w - cw))
    y0 = torch.where(none_fit, (h - ch) / 2, _rand((n,), generator, device) * (h - ch))
    m = _eye(n, device)
    m[:, 0, 0], m[:, 1, 1] = cw / w, ch / h
    m[:, 0, 2], m[:, 1, 2] = x0 + cw / 2 - w / 2, y0 + ch / 2 - h / 2
    return m


class _TrivialAugmentDraw:
    """One TrivialAugmentWide draw per sample: an op index, a magnitude and a sign."""

    def __init__(self, n: int, generator: torch.Generator | None, device: torch.device) -> None:
        self.op = _randint(len(TA_OPS), (n,), generator, device)
        self.bin = _randint(TA_BINS, (n,), generator, device)
        self.sign = torch.where(_rand((n,), generator, device) < 0.5, -1.0, 1.0)

    def is_op(self, name: str) -> Tensor:
        return self.op == TA_OPS.index(name)

    def linear(self, lo: float, hi: float) -> Tensor:
        """The magnitude of each sample's bin on a linear scale lo→hi (unsigned)."""
        return lo + (hi - lo) * self.bin.float() / (TA_BINS - 1)

    def factor(self, name: str) -> Tensor:
        """Blend factor 1 ± magnitude for samples drawing `name`, 1 (no change) for the others."""
        return torch.where(
            self.is_op(name), 1.0 + self.sign * self.linear(0.0, 0.99), torch.ones_like(self.sign)
        )


def _trivial_augment_geometry(ta: _TrivialAugmentDraw, h: int, w: int) -> Tensor:
    """(n, 3, 3) output→input maps of the geometric TrivialAugmentWide ops (identity for other samples)."""
    n, device = ta.op.shape[0], ta.op.device
    m = _eye(n, device)
    shear = ta.sign * ta.linear(0.0, 0.99)
    m[:, 0, 1] = torch.where(ta.is_op("ShearX"), shear, 0.0)
    m[:, 1, 0] = torch.where(ta.is_op("ShearY"), shear, 0.0)
    shift = ta.sign * ta.linear(0.0, TA_MAX_TRANSLATE_FRACTION)
    m[:, 0, 2] = torch.where(ta.is_op("TranslateX"), shift * w, 0.0)
    m[:, 1, 2] = torch.where(ta.is_op("TranslateY"), shift * h, 0.0)
    angle = torch.where(ta.is_op("Rotate"), ta.sign * torch.deg2rad(ta.linear(0.0, 135.0)), 0.0)
    return _rotation(angle) @ m


def _trivial_augment_colour(x: Tensor, ta: _TrivialAugmentDraw) -> Tensor:
    """The pixel TrivialAugmentWide ops; each is the identity for samples that did not draw it."""
    x = adjust_brightness(x, ta.factor("Brightness"))
    x = adjust_saturation(x, ta.factor("Color"))
    x = adjust_contrast(x, ta.factor("Contrast"))
    x = adjust_sharpness(x, ta.factor("Sharpness"))
    bits = (8 - (ta.bin.float() / ((TA_BINS - 1) / 6)).round()).long()
    x = torch.where(_per_sample(ta.is_op("Posterize")), posterize(x, bits), x)
    threshold = torch.where(ta.is_op("Solarize"), ta.linear(1.0, 0.0), 2.0)
    x = solarize(x, threshold)
    x = torch.where(_per_sample(ta.is_op("AutoContrast")), autocontrast(x), x)
    return torch.where(_per_sample(ta.is_op("Equalize")), equalize(x), x)


def _random_erasing(x: Tensor, generator: torch.Generator | None, tries: int = 10) -> Tensor:
    """torchvision's RandomErasing (p=0.25, value 0 after normalisation), one rectangle per chosen sample."""
    n, _, h, w = x.shape
    device = x.device
    chosen = _rand((n,), generator, device) < ERASE_P
    area = h * w * _uniform(n * tries, *ERASE_SCALE, generator, device).view(n, tries)
    log_ratio = _uniform(n * tries, math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]), generator, device)
    ratio = torch.exp(log_ratio).view(n, tries)
    eh, ew = torch.sqrt(area * ratio).round(), torch.sqrt(area / ratio).round()
    fits = (eh < h) & (ew < w)
    first = fits.float().argmax(dim=1, keepdim=True)
    eh, ew = eh.gather(1, first).squeeze(1), ew.gather(1, first).squeeze(1)
    chosen = chosen & fits.any(dim=1)
    top = (_rand((n,), generator, device) * (h - eh + 1)).floor()
    left = (_rand((n,), generator, device) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    inside = (
        (rows >= top.view(-1, 1, 1))
        & (rows < (top + eh).view(-1, 1, 1))
        & (cols >= left.view(-1, 1, 1))
        & (cols < (left + ew).view(-1, 1, 1))
    )
    mask = (inside & chosen.view(-1, 1, 1)).unsqueeze(1)
    return x.masked_fill(mask, 0.0)
