"""Batched per-sample augmentation: shapes, normalisation, randomness per sample, reproducibility, ops."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from carsml.data import transform_kernels as T
from carsml.data.transforms import POLICIES, build_transform, view_transform
from carsml.errors import ConfigError, DataError


def _images(n: int = 6, h: int = 20, w: int = 28, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _normalised(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("train", [True, False])
def test_output_dtype_shape_and_range(policy: str, train: bool) -> None:
    x = _images()
    out = build_transform(policy)(x, train=train, generator=_gen(0))
    assert out.dtype == torch.float32
    assert out.shape == x.shape
    # mean = std = 0.5 maps [0, 255] onto [-1, 1]; augmentation must stay inside it.
    assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6


@pytest.mark.parametrize("policy", POLICIES)
def test_eval_mode_only_normalises(policy: str) -> None:
    x = _images()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    t = build_transform(policy, mean=mean, std=std)
    expected = _normalised(x, mean, std)
    torch.testing.assert_close(t(x, train=False, generator=_gen(1)), expected)
    torch.testing.assert_close(t(x, train=False, generator=_gen(2)), expected)


def test_none_policy_train_is_normalise_only() -> None:
    x = _images()
    torch.testing.assert_close(build_transform("none")(x, train=True), _normalised(x, (0.5,) * 3, (0.5,) * 3))


@pytest.mark.parametrize("policy", ["study", "strong"])
def test_each_sample_gets_its_own_augmentation(policy: str) -> None:
    x = _images(1).expand(8, -1, -1, -1).contiguous()  # eight identical images
    out = build_transform(policy)(x, train=True, generator=_gen(3))
    distinct = {tuple(out[i].flatten()[:: 37].tolist()) for i in range(out.shape[0])}
    assert len(distinct) >= 6, "identical images must receive different random augmentations"
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("policy", ["study", "strong"])
def test_seeded_generator_reproducible(policy: str) -> None:
    x = _images()
    t = build_transform(policy)
    a = t(x, train=True, generator=_gen(7))
    b = t(x, train=True, generator=_gen(7))
    c = t(x, train=True, generator=_gen(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("policy", ["study", "strong"])
def test_channels_last_input_gives_same_result(policy: str) -> None:
    x = _images()
    t = build_transform(policy)
    a = t(x, train=True, generator=_gen(5))
    b = t(x.contiguous(memory_format=torch.channels_last), train=True, generator=_gen(5))
    torch.testing.assert_close(a, b)


def test_unknown_policy_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        build_transform("fancy")
    for name in POLICIES:
        assert name in str(info.value)
    assert "fancy" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"mean": (0.5, 0.5)}, "mean"), ({"std": (0.5, 0.0, 0.5)}, "std"), ({"mixup": -1.0}, "mixup"),
     ({"cutmix": float("nan")}, "cutmix")],
)  # fmt: skip
def test_bad_options_raise_config_error(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        build_transform("study", **kwargs)


def test_bad_input_raises_data_error() -> None:
    t = build_transform("study")
    with pytest.raises(DataError, match="uint8"):
        t(torch.rand(2, 3, 8, 8), train=True)
    with pytest.raises(DataError, match="uint8"):
        t(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), train=True)


# ---------------------------------------------------------------------------------------------- geometry
def test_warp_flip_and_rotations_are_exact() -> None:
    x = _images(2, 12, 12).float() / 255.0
    flip = T._hflip(torch.tensor([True, True]))
    torch.testing.assert_close(T._warp(x, flip), x.flip(-1), atol=1e-5, rtol=0)
    # Output pixel p shows input pixel R p (y down): a +90° matrix turns the content counter-clockwise.
    rot90 = T._rotation(torch.full((2,), math.pi / 2))
    torch.testing.assert_close(T._warp(x, rot90), torch.rot90(x, k=1, dims=(2, 3)), atol=1e-5, rtol=0)
    y = _images(2, 10, 16).float() / 255.0  # 180° on a non-square image: aspect handling must cancel out
    torch.testing.assert_close(T._warp(y, T._rotation(torch.full((2,), math.pi))), y.flip(-1).flip(-2), atol=1e-5,
                               rtol=0)  # fmt: skip


def test_random_resized_crop_stays_inside_image_with_valid_area() -> None:
    h, w = 24, 40
    m = T._random_resized_crop(500, h, w, _gen(0), torch.device("cpu"))
    corners = torch.tensor([[-w / 2, -h / 2, 1.0], [w / 2, h / 2, 1.0]]).T  # output corners (centred pixels)
    mapped = m @ corners
    assert (mapped[:, 0].abs() <= w / 2 + 1e-3).all() and (mapped[:, 1].abs() <= h / 2 + 1e-3).all()
    area = m[:, 0, 0] * m[:, 1, 1]  # crop area as a fraction of the image
    assert area.min() >= 0.35 - 1e-5 and area.max() <= 1.0 + 1e-5
    assert area.max() - area.min() > 0.3  # the scale really varies per sample
    ratio = (m[:, 0, 0] * w) / (m[:, 1, 1] * h)
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4


def test_random_erasing_rectangles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T, "ERASE_P", 1.0)
    x = torch.rand(64, 3, 32, 32) + 0.5  # never 0, so erased pixels are exactly the zeros
    out = T._random_erasing(x, _gen(0))
    erased = (out == 0).all(dim=1).float().mean(dim=(1, 2))
    assert (erased > 0).all()
    assert erased.min() >= 0.015 and erased.max() <= 0.36
    zeros = out == 0
    assert (zeros.all(dim=1) | ~zeros.any(dim=1)).all(), "all channels of a pixel are erased together"


# ---------------------------------------------------------------------------------------------- colour ops
def test_per_sample_colour_ops_match_torchvision() -> None:
    x = torch.rand(2, 3, 9, 11)
    factors = torch.tensor([0.6, 1.7])
    pairs = [(T.adjust_brightness, TF.adjust_brightness), (T.adjust_contrast, TF.adjust_contrast),
             (T.adjust_saturation, TF.adjust_saturation), (T.adjust_sharpness, TF.adjust_sharpness)]  # fmt: skip
    for ours, theirs in pairs:
        out = ours(x, factors)
        for i in range(2):
            torch.testing.assert_close(out[i], theirs(x[i], float(factors[i])), atol=1e-5, rtol=0)
    u8 = T._to_uint8(x)
    post = T.posterize(x, torch.tensor([3, 6]))
    for i, bits in enumerate((3, 6)):
        torch.testing.assert_close(post[i], TF.posterize(u8[i], bits).float() / 255.0)
    sol = T.solarize(x, torch.tensor([0.3, 0.8]))
    for i, thr in enumerate((0.3, 0.8)):
        torch.testing.assert_close(sol[i], TF.solarize(x[i], thr))
    torch.testing.assert_close(T.autocontrast(x), TF.autocontrast(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(T.equalize(x), TF.equalize(u8).float() / 255.0)


def test_study_jitter_and_identity_ops() -> None:
    x = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(T.adjust_contrast(x, torch.ones(3)), x)
    torch.testing.assert_close(T.solarize(x, torch.full((3,), 2.0)), x)
    torch.testing.assert_close(T.posterize(x, torch.full((3,), 8)), T._to_uint8(x).float() / 255.0)


# ---------------------------------------------------------------------------------------------- mixing
def test_mix_without_alpha_is_one_hot() -> None:
    t = build_transform("strong")
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([0, 2, 1, 2])
    out, targets = t.mix(x, y, 3, generator=_gen(0))
    assert not t.mixes
    assert out is x
    torch.testing.assert_close(targets, torch.nn.functional.one_hot(y, 3).float())


def test_mixup_mixes_images_and_targets_consistently() -> None:
    t = build_transform("strong", mixup=0.4)
    x = torch.rand(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    out, targets = t.mix(x, y, 5, generator=_gen(1))
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(6))
    lam = float(targets[1, 1])  # sample 1 (label 1) is mixed with sample 4 (label 4)
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(targets[1, 4], torch.tensor(1.0 - lam))
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0))


def test_cutmix_lambda_matches_pasted_area() -> None:
    t = build_transform("strong", cutmix=1.0)
    x = torch.rand(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3])
    for seed in range(5):
        out, targets = t.mix(x, y, 4, generator=_gen(seed))
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))
        from_partner = (out[0] == x.flip(0)[0]).all(dim=0) & (out[0] != x[0]).any(dim=0)
        lam = float(targets[0, 0])
        assert abs((1.0 - lam) - float(from_partner.float().mean())) < 1e-6


def test_mix_is_reproducible_and_both_modes_are_used() -> None:
    t = build_transform("strong", mixup=0.2, cutmix=1.0)
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    a = t.mix(x, y, 4, generator=_gen(3))
    b = t.mix(x, y, 4, generator=_gen(3))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    # mixup changes every pixel, cutmix only a box: across seeds both must occur.
    kinds = set()
    for seed in range(20):
        out, _ = t.mix(x, y, 4, generator=_gen(seed))
        kinds.add("mixup" if bool((out != x).all()) else "cutmix")
    assert kinds == {"mixup", "cutmix"}


# ---------------------------------------------------------------------------------------------- views (TTA)
def test_views_shape_and_independence() -> None:
    x = _images(3)
    t = view_transform("study")
    views = t.views(x, 4, generator=_gen(0))
    assert views.shape == (4, *x.shape)
    assert not torch.allclose(views[0], views[1])
    torch.testing.assert_close(views, t.views(x, 4, generator=_gen(0)), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="n_views"):
        t.views(x, 0)
