"""Augmentation on real pixels (the carsml recipe's `cache_scale`), checked on real Stanford Cars crops.

Regression guard: the training cache must keep more pixels than the model's input, so that a random crop samples the
car's real detail instead of upsampling a small image; and evaluation must see the geometry training sees (the whole
box, resized), so the two never disagree about what an image is. Verdicts compare errors against the full-resolution
JPEG, with margins of whole grey levels between a right and a wrong pipeline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from carsml.cli import run_experiment
from carsml.data.cache import build_cache
from carsml.data.table import make_table
from carsml.data.transform_kernels import _warp
from carsml.data.transforms import build_transform
from carsml.errors import ConfigError
from tests.conftest import TINY

SIZE = 32


def _real_table(shared_data: Path, n: int = 8) -> pd.DataFrame:
    index = pd.read_csv(shared_data / "sample" / "sample_index.csv").head(n)
    folder = shared_data / "sample" / "cars_train_bbox_cropped"
    rows = [{"path": str(folder / r.fname), "label": i % 2, "class_name": r.class_name, "x1": 0, "y1": 0,
             "x2": int(r.crop_width), "y2": int(r.crop_height), "split": "train", "fname": r.fname}
            for i, r in enumerate(index.itertuples(index=False))]
    return make_table(rows)


def _batch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous()


def _left_half_from_jpeg(path: str) -> np.ndarray:
    """The ground truth: the left half of the full-resolution image, resized (antialiased) to SIZE x SIZE."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        half = rgb.crop((0, 0, rgb.width // 2, rgb.height))
        return np.asarray(half.resize((SIZE, SIZE), Image.Resampling.BILINEAR, reducing_gap=None), np.float32)


def _left_half(cached: np.ndarray) -> np.ndarray:
    """What the augmentation makes of a crop of the left half (full height) of a cached image, at SIZE x SIZE."""
    x = _batch(cached).float() / 255
    m = torch.eye(3).expand(len(x), 3, 3).clone()
    h, w = x.shape[-2:]
    m[:, 0, 0], m[:, 0, 2] = 0.5, -w / 4  # output -> input: half the width, centred on the left half
    out = _warp(x, m, SIZE)
    return out.permute(0, 2, 3, 1).numpy() * 255


def test_random_crops_sample_real_pixels_from_a_larger_cache(shared_data: Path, tmp_path: Path) -> None:
    table = _real_table(shared_data)
    small = build_cache(table, SIZE, cache_dir=tmp_path)
    large = build_cache(table, 3 * SIZE, cache_dir=tmp_path)
    assert large.images.shape[1:3] == (3 * SIZE, 3 * SIZE) and small.images.shape[1:3] == (SIZE, SIZE)
    truth = np.stack([_left_half_from_jpeg(p) for p in table["path"]])
    err_large = np.abs(_left_half(large.images) - truth).mean()
    err_small = np.abs(_left_half(small.images) - truth).mean()
    # the crop from the larger cache is far closer to the real pixels than an upsampled piece of the small one
    assert err_large + 2.0 < err_small, (err_large, err_small)


@pytest.mark.parametrize("policy", ["none", "study", "crop", "strong"])
def test_training_and_evaluation_agree_on_geometry(shared_data: Path, tmp_path: Path, policy: str) -> None:
    table = _real_table(shared_data)
    small = build_cache(table, SIZE, cache_dir=tmp_path)  # what evaluation, analysis and serving decode
    large = build_cache(table, 3 * SIZE // 2, cache_dir=tmp_path)  # what the augmentation reads (cache_scale 1.5)
    tf = build_transform(policy, size=SIZE)
    evaluated = tf(_batch(small.images), train=False)
    assert evaluated.shape == (len(table), 3, SIZE, SIZE)
    # evaluation of the larger image = the whole box at the model size: the same picture as the small cache's
    from_large = tf(_batch(large.images), train=False)
    assert (from_large - evaluated).abs().mean() * 127.5 < 4.0  # grey levels; a 12 % centre crop would cost > 10
    centre_crop = torch.eye(3).expand(len(table), 3, 3).clone()
    centre_crop[:, 0, 0] = centre_crop[:, 1, 1] = 0.875
    cropped = tf.normalise(_warp(_batch(large.images).float() / 255, centre_crop, SIZE))
    assert (cropped - evaluated).abs().mean() * 127.5 > 10.0
    # training produces the model's size from the larger cache, for every policy
    assert tf(_batch(large.images), train=True, generator=torch.Generator().manual_seed(0)).shape == evaluated.shape


def test_cache_scale_below_one_is_refused_before_a_run() -> None:
    with pytest.raises(ConfigError, match=r"cache_scale=0\.5: the training cache side \(16 px\) must be at least"):
        run_experiment("improved", {**TINY, "cache_scale": 0.5})


def test_a_recipe_run_trains_from_the_larger_cache(tmp_path: Path) -> None:
    import mlflow

    cache = tmp_path / "cache"
    run_experiment("improved", {**TINY, "recipe": "carsml", "epochs": 3, "batch_size": 16, "log_model": False,
                                "cache_dir": str(cache)})
    params = mlflow.last_active_run().data.params
    assert (params["recipe"], params["augmentation"], params["cache_scale"]) == ("carsml", "crop", "1.5")
    assert params["optimizer"] == "adamw" and params["decay_norm_bias"] == "false"
    sides = sorted(np.load(f, mmap_mode="r").shape[1] for f in cache.glob("decoded/*/images.npy"))
    size = TINY["image_size"]
    assert sides == [size, size, round(size * 1.5)]  # train and test at the model size, train again for augmentation
