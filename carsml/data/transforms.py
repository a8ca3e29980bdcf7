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

This module holds the policies and `BatchTransform`; the per-sample kernels they compose (random draws, the warp,
colour ops, RandomResizedCrop / TrivialAugmentWide / RandomErasing) are in `carsml.data.transform_kernels`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from carsml.data.transform_kernels import (
    _hflip,
    _rand,
    _randint,
    _random_erasing,
    _random_resized_crop,
    _rotation,
    _trivial_augment_colour,
    _trivial_augment_geometry,
    _TrivialAugmentDraw,
    _uniform,
    _warp,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
)
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

    `policy` is one of POLICIES (see the module docstring); the output is `size` x `size` (None: the input's size).
    mean / std default to 0.5 (our CNNs); pass a pretrained model's own statistics for timm models. `mixup` /
    `cutmix` are Beta alphas (0 = off). `build_transform` is this constructor.

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


# The factory is the constructor itself: one keyword signature to keep in step.
build_transform = BatchTransform


def view_transform(
    policy: str, *, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD
) -> BatchTransform:
    """A transform for random test-time views (no label mixing): call `.views(x, n, generator)` or
    `(x, train=True, generator=g)` for one view per image."""
    return BatchTransform(policy, mean=mean, std=std)
