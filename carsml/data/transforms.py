"""Batched, per-sample random augmentation of uint8 N×C×H×W tensors, on whatever device the batch lives on.

`torchvision.transforms.v2` draws ONE set of random parameters per call, so applied to a batch every image
gets the same flip / angle / crop. Here each sample draws its own parameters from an optional
`torch.Generator` (same generator state → same augmentation, on any device), and all geometry is done with
one `F.affine_grid` + `F.grid_sample` per batch.

Policies (`train=True`; with `train=False` every policy only resizes, scales to [0, 1] and normalises):
    none    scale + normalise (the study's baseline)
    study   horizontal flip p=0.5, rotation ±15°, brightness and contrast factors in [0.8, 1.2]
    crop    random resized crop (scale 0.7–1, ratio 3/4–4/3) + rotation ±10° + flip + brightness / contrast /
            saturation factors in [0.8, 1.2], one resampling: the carsml recipe's policy (real pixels when the
            cache is larger than the output)
    strong  random resized crop (scale 0.35–1, ratio 3/4–4/3) + flip + TrivialAugmentWide + random erasing
            p=0.25, optionally followed by mixup / cutmix (`BatchTransform.mix`, which also mixes labels)

Output size: `size` (the model's input side); None keeps the input's. The training cache may store images larger than
the model's input (`cache_scale`), so that a random crop samples real pixels instead of upsampling a small image; every
geometric policy resamples straight from the stored image to the output size (one bilinear resampling), and the
evaluation path resizes the whole image (antialiased) — what a crop of scale 1 shows in training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from carsml.errors import ConfigError, DataError

POLICIES = ("none", "study", "crop", "strong")
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)

# "study" policy
STUDY_MAX_ROTATION_DEG = 15.0
STUDY_JITTER = 0.2  # brightness and contrast factors drawn from [1 - j, 1 + j]

# "crop" policy
# chosen on the real dev set's validation split (docs/study.md): stronger zooms (scale down to 0.25 or 0.5) cost 7-13
# points of validation accuracy at a 30-epoch budget; mild zoom plus a small rotation beat no zoom at all
CROP_POLICY_SCALE = (0.7, 1.0)
CROP_POLICY_ROTATION_DEG = 10.0
CROP_POLICY_JITTER = 0.2  # brightness, contrast and saturation factors drawn from [1 - j, 1 + j]

# "strong" policy
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


# ---------------------------------------------------------------------------------------------- the transform
def _check_stats(name: str, values: Sequence[float]) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected 3 numbers (one per RGB channel); got {values!r}") from None
    if len(out) != 3:
        raise ConfigError(f"{name}: expected 3 numbers (one per RGB channel); got {values!r}")
    if name == "std" and min(out) <= 0:
        raise ConfigError(f"std: expected positive values; got {values!r}")
    return out  # type: ignore[return-value]


class BatchTransform:
    """Augment (train) or just normalise (eval) a uint8 N×C×H×W batch into float32 normalised N×C×H×W.

    `__call__(x, train, generator=None)`: every sample draws its own random parameters from `generator`
    (the global CPU RNG when None). `mix(x, y, num_classes)` applies mixup / cutmix when enabled.
    `views(x, n_views)` returns several independent augmented views per image (test-time augmentation).
    """

    def __init__(
        self,
        policy: str,
        *,
        size: int | None = None,
        mean: Sequence[float] = DEFAULT_MEAN,
        std: Sequence[float] = DEFAULT_STD,
        mixup: float = 0.0,
        cutmix: float = 0.0,
    ) -> None:
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ConfigError(f"transform size: expected a positive number of pixels or None; got {size!r}")
        if policy not in POLICIES:
            raise ConfigError(f"augmentation policy: expected one of {', '.join(POLICIES)}; got {policy!r}")
        for name, alpha in (("mixup", mixup), ("cutmix", cutmix)):
            if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
                raise ConfigError(f"{name}: expected a Beta alpha >= 0 (0 = off); got {alpha!r}")
        self.policy = policy
        self.size = size
        self.mean = _check_stats("mean", mean)
        self.std = _check_stats("std", std)
        self.mixup = float(mixup)
        self.cutmix = float(cutmix)

    def __repr__(self) -> str:
        return (
            f"BatchTransform(policy={self.policy!r}, size={self.size}, mean={self.mean}, std={self.std}, "
            f"mixup={self.mixup}, cutmix={self.cutmix})"
        )

    @property
    def mixes(self) -> bool:
        """Whether `mix` changes anything (mixup or cutmix enabled)."""
        return self.mixup > 0 or self.cutmix > 0

    def normalise(self, x01: Tensor) -> Tensor:
        """(x - mean) / std per channel for a float batch in [0, 1]."""
        mean = torch.tensor(self.mean, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
        return (x01 - mean) / std

    def __call__(self, x: Tensor, train: bool, generator: torch.Generator | None = None) -> Tensor:
        if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise DataError(
                f"BatchTransform input: expected a uint8 tensor of shape (N, 3, H, W); got {desc}"
            )
        x01 = x.float().div_(255.0)
        if not train or self.policy == "none" or x.shape[0] == 0:
            return self.normalise(self.resize(x01))
        if self.policy == "study":
            return self.normalise(self._study(x01, generator))
        if self.policy == "crop":
            return self.normalise(self._crop(x01, generator))
        return _random_erasing(self.normalise(self._strong(x01, generator)), generator)

    def resize(self, x01: Tensor) -> Tensor:
        """The whole image at the output size (bilinear, antialiased); unchanged when it already has that size."""
        if self.size is None or x01.shape[-2:] == (self.size, self.size):
            return x01
        return F.interpolate(x01, size=(self.size, self.size), mode="bilinear", antialias=True,
                             align_corners=False).clamp_(0.0, 1.0)

    def _study(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        n, device = x.shape[0], x.device
        flip = _rand((n,), generator, device) < 0.5
        angle = torch.deg2rad(_uniform(n, -STUDY_MAX_ROTATION_DEG, STUDY_MAX_ROTATION_DEG, generator, device))
        brightness = _uniform(n, 1 - STUDY_JITTER, 1 + STUDY_JITTER, generator, device)
        contrast = _uniform(n, 1 - STUDY_JITTER, 1 + STUDY_JITTER, generator, device)
        x = _warp(x, _rotation(angle) @ _hflip(flip), self.size)
        return adjust_contrast(adjust_brightness(x, brightness), contrast)

    def _crop(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        n, _, h, w = x.shape
        device = x.device
        crop = _random_resized_crop(n, h, w, generator, device, scale=CROP_POLICY_SCALE)
        flip = _hflip(_rand((n,), generator, device) < 0.5)
        lo, hi = 1 - CROP_POLICY_JITTER, 1 + CROP_POLICY_JITTER
        brightness, contrast, saturation = (_uniform(n, lo, hi, generator, device) for _ in range(3))
        angle = torch.deg2rad(_uniform(n, -CROP_POLICY_ROTATION_DEG, CROP_POLICY_ROTATION_DEG, generator, device))
        x = _warp(x, crop @ _rotation(angle) @ flip, self.size)
        return adjust_saturation(adjust_contrast(adjust_brightness(x, brightness), contrast), saturation)

    def _strong(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        n, _, h, w = x.shape
        device = x.device
        crop = _random_resized_crop(n, h, w, generator, device)
        flip = _hflip(_rand((n,), generator, device) < 0.5)
        ta = _TrivialAugmentDraw(n, generator, device)
        # crop → flip → TrivialAugment geometry composed into ONE resampling: sharper than three, and content
        # a shear / rotation brings in from beyond the crop is real image rather than black fill.
        x = _warp(x, crop @ flip @ _trivial_augment_geometry(ta, h, w), self.size)
        return _trivial_augment_colour(x, ta)

    def mix(
        self, x: Tensor, y: Tensor, num_classes: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Mixup or cutmix (one of them per batch, 50/50 when both are enabled) → (images, soft targets).

        Each image is mixed with its mirror in the batch (`x.flip(0)`, as timm does) with a weight drawn from
        Beta(alpha, alpha); soft targets are the same mix of one-hot labels and sum to 1. Without mixing
        enabled the images are returned unchanged with one-hot targets.
        """
        targets = F.one_hot(y.long(), num_classes).to(x.dtype)
        if not self.mixes or x.shape[0] == 0:
            return x, targets
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or float(_rand((1,), generator, x.device)) < 0.5)
        alpha = self.cutmix if use_cutmix else self.mixup
        # torch has no seeded Beta sampler, so seed numpy's from the torch generator (keeps reproducibility).
        seed = int(_randint(2**62, (1,), generator, torch.device("cpu")))
        lam = float(np.random.default_rng(seed).beta(alpha, alpha))
        partner = x.flip(0)
        if use_cutmix:
            x, lam = self._cutmix(x, partner, lam, generator)
        else:
            x = lam * x + (1.0 - lam) * partner
        return x, lam * targets + (1.0 - lam) * targets.flip(0)

    @staticmethod
    def _cutmix(
        x: Tensor, partner: Tensor, lam: float, generator: torch.Generator | None
    ) -> tuple[Tensor, float]:
        """Paste one box of `partner` into every image; returns the images and lam adjusted to the box."""
        _, _, h, w = x.shape
        cut = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(h * cut), int(w * cut)
        cy = int(_randint(h, (1,), generator, torch.device("cpu")))
        cx = int(_randint(w, (1,), generator, torch.device("cpu")))
        y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        out = x.clone()
        out[:, :, y1:y2, x1:x2] = partner[:, :, y1:y2, x1:x2]
        return out, 1.0 - (y2 - y1) * (x2 - x1) / (h * w)

    def views(self, x: Tensor, n_views: int, generator: torch.Generator | None = None) -> Tensor:
        """`n_views` independently augmented views of each image: float tensor (n_views, N, C, H, W)."""
        if n_views < 1:
            raise ConfigError(f"n_views: expected a positive integer; got {n_views}")
        return torch.stack([self(x, train=True, generator=generator) for _ in range(n_views)])


def build_transform(
    policy: str,
    *,
    size: int | None = None,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
    mixup: float = 0.0,
    cutmix: float = 0.0,
) -> BatchTransform:
    """The batch transform for an augmentation policy (see POLICIES and the module docstring), producing
    `size` x `size` images (None: the input's size).

    mean / std default to 0.5 (our CNNs); pass a pretrained model's own statistics for timm models.
    """
    return BatchTransform(policy, size=size, mean=mean, std=std, mixup=mixup, cutmix=cutmix)


def view_transform(
    policy: str, *, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD
) -> BatchTransform:
    """A transform for random test-time views (no label mixing): call `.views(x, n, generator)` or
    `(x, train=True, generator=g)` for one view per image."""
    return BatchTransform(policy, mean=mean, std=std)
