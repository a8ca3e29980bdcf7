"""Models: the study's two CNNs, the factory over them and timm, weights files, offline pretrained weights."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from carsml.config import load_config
from carsml.errors import CarsmlError, ConfigError
from carsml.experiments.common import build_model
from carsml.models import pretrained
from carsml.models.baseline import BaselineCNN
from carsml.models.factory import (
    count_parameters,
    create_model,
    feature_dim,
    list_models,
    model_config,
    resolve_data_config,
)
from carsml.models.improved import ImprovedCNN, ResidualBlock, SqueezeExcite

SMALL = {"head_widths": (32, 16)}  # tiny heads keep the CPU tests fast
TINY_TIMM = "test_resnet"  # ~0.4M parameters, in timm's registry for exactly this purpose
OUR_CNNS = ("baseline_cnn", "improved_cnn")


def _images(size: int, n: int = 2, chans: int = 3) -> torch.Tensor:
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(0))


def _residual_params(channels: int) -> int:
    """Two 3x3 convs with bias and two BatchNorms (weight + bias) on `channels` maps."""
    return 2 * (channels * channels * 9 + channels) + 2 * 2 * channels


# ------------------------------------------------------------------------------------------------ our CNNs


@pytest.mark.parametrize("name", OUR_CNNS)
@pytest.mark.parametrize("size", [32, 48, 64, 70])
def test_cnn_outputs_one_logit_per_class_at_any_size(name: str, size: int) -> None:
    model = create_model(name, 5, size, **SMALL).eval()
    assert model(_images(size)).shape == (2, 5)


@pytest.mark.parametrize("size", [32, 64, 100, 224])
def test_flatten_size_is_derived_from_image_size(size: int) -> None:
    model = BaselineCNN(3, size, head_widths=(8,))
    side = size // 32  # five 2x2 poolings, each flooring
    assert model.flat_features == 256 * side * side
    assert model.head[0].fc.in_features == model.flat_features
    assert model.forward_features(_images(size, n=1)).shape == (1, 256, side, side)


@pytest.mark.parametrize("name", OUR_CNNS)
def test_image_size_too_small_for_five_poolings(name: str) -> None:
    with pytest.raises(ConfigError, match="image_size"):
        create_model(name, 5, 31, **SMALL)


def test_improved_is_the_baseline_plus_two_residual_blocks() -> None:
    base, improved = BaselineCNN(7, 64, **SMALL), ImprovedCNN(7, 64, **SMALL)
    extra = count_parameters(improved) - count_parameters(base)
    assert extra == _residual_params(32) + _residual_params(64)
    # every baseline tensor exists in the improved net under the same name and shape: same trunk, same head
    improved_sd = improved.state_dict()
    for key, value in base.state_dict().items():
        assert improved_sd[key].shape == value.shape, key
    blocks = [m for m in improved.modules() if isinstance(m, ResidualBlock)]
    assert [b.conv1.in_channels for b in blocks] == [32, 64]


def test_improved_at_study_size_has_about_112m_parameters() -> None:
    with torch.device("meta"):  # no memory, no initialisation: only the shapes
        model = create_model("improved_cnn", 196, 224)
    n = count_parameters(model)
    assert abs(n - 112e6) <= 0.05 * 112e6, n
    assert model.head[0].fc.in_features == 256 * 7 * 7 == 12_544
    assert [layer.fc.out_features for layer in model.head] == [8192, 1024, 512, 256]


def test_next_step_options_change_the_architecture_and_still_forward() -> None:
    plain = create_model("improved_cnn", 4, 64, **SMALL)
    gap = create_model("improved_cnn", 4, 64, head="gap", **SMALL)
    se = create_model("improved_cnn", 4, 64, se=True, **SMALL)
    late = create_model("improved_cnn", 4, 64, late_residual=True, **SMALL)
    for model in (plain, gap, se, late):
        assert model.eval()(_images(64)).shape == (2, 4)
    assert gap.flat_features == 256 and plain.flat_features == 256 * 2 * 2
    assert count_parameters(gap) < count_parameters(plain)
    assert sum(isinstance(m, SqueezeExcite) for m in se.modules()) == 2
    assert not any(isinstance(m, SqueezeExcite) for m in plain.modules())
    late_blocks = [m.conv1.in_channels for m in late.modules() if isinstance(m, ResidualBlock)]
    assert late_blocks == [32, 64, 128, 256]
    assert count_parameters(late) - count_parameters(plain) == _residual_params(128) + _residual_params(256)


def test_gap_head_works_on_the_baseline_too_and_is_size_independent() -> None:
    a, b = BaselineCNN(3, 32, head="gap", **SMALL), BaselineCNN(3, 96, head="gap", **SMALL)
    assert count_parameters(a) == count_parameters(b)


def test_improved_only_options_are_rejected_on_the_baseline() -> None:
    off = create_model("baseline_cnn", 3, 32, se=False, late_residual=False, **SMALL)
    assert isinstance(off, BaselineCNN) and not isinstance(off, ImprovedCNN)
    with pytest.raises(ConfigError, match="se=True.*improved_cnn"):
        create_model("baseline_cnn", 3, 32, se=True, **SMALL)
    with pytest.raises(ConfigError, match="colour"):
        create_model("improved_cnn", 3, 32, colour=True, **SMALL)


def test_dropout_default_scalar_and_per_layer() -> None:
    default = BaselineCNN(3, 32)
    assert default.dropout_rates == (0.5, 0.45, 0.35, 0.3)
    assert [layer.drop.p for layer in default.head] == list(default.dropout_rates)
    assert BaselineCNN(3, 32, dropout=0.2, **SMALL).dropout_rates == (0.2, 0.2)
    assert [m.drop.p for m in BaselineCNN(3, 32, dropout=[0.1, 0.4], **SMALL).head] == [0.1, 0.4]
    with pytest.raises(ConfigError, match="dropout"):
        BaselineCNN(3, 32, dropout=[0.1], **SMALL)
    with pytest.raises(ConfigError, match="dropout"):
        BaselineCNN(3, 32, dropout=1.0, **SMALL)


@pytest.mark.parametrize("name", OUR_CNNS)
def test_timm_like_interface(name: str) -> None:
    model = create_model(name, 6, 64, **SMALL).eval()
    x = _images(64)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        assert feats.shape == (2, 16) == (2, model.num_features) == (2, feature_dim(model))
        torch.testing.assert_close(model.get_classifier()(feats), model(x))
        model.reset_classifier(9)
        assert model(x).shape == (2, 9) and model.num_classes == 9
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), feats)


def test_in_chans_option() -> None:
    model = create_model("improved_cnn", 3, 32, in_chans=1, **SMALL).eval()
    assert model(_images(32, chans=1)).shape == (2, 3)
    assert resolve_data_config(model)["mean"] == (0.5,)


# ---------------------------------------------------------------------------------- factory: names, configs


def test_unknown_names_suggest_close_ones() -> None:
    with pytest.raises(ConfigError, match="resnet50"):
        create_model("resnet5O", 3)
    with pytest.raises(ConfigError, match="baseline_cnn"):
        create_model("baseline_cn", 3)
    with pytest.raises(ConfigError, match="tag"):
        create_model("resnet50.no_such_tag", 3)


def test_list_models_has_ours_and_timms() -> None:
    names = list_models()
    study = {"baseline_cnn", "improved_cnn", "resnet50", "vgg16", "densenet121", "efficientnet_b0"}
    assert study <= set(names)
    assert len(names) == len(timm.list_models()) + 2


def test_our_cnns_have_no_pretrained_weights() -> None:
    with pytest.raises(ConfigError, match="weights="):
        create_model("baseline_cnn", 3, 32, pretrained=True, **SMALL)
    with pytest.raises(ConfigError, match="not both"):
        create_model(TINY_TIMM, 3, pretrained=True, weights="some.pth")


@pytest.mark.parametrize("kwargs", [
    {"name": "improved_cnn", "head": "gap", "se": True, "late_residual": True, "dropout": 0.25,
     "in_chans": 1},
    {"name": "baseline_cnn", "dropout": [0.3, 0.1]},
    {"name": TINY_TIMM, "dropout": 0.2},
    {"name": "test_efficientnet", "dropout": 0.3, "drop_path_rate": 0.1},
])
def test_model_config_round_trip(kwargs: dict) -> None:
    kwargs = dict(kwargs)
    name = kwargs.pop("name")
    opts = SMALL if name in OUR_CNNS else {}
    model = create_model(name, 5, 64, **opts, **kwargs).eval()
    cfg = json.loads(json.dumps(model_config(model)))  # JSON-serialisable, and survives a trip through JSON
    assert cfg["name"] == name and cfg["num_classes"] == 5 and cfg["image_size"] == 64
    if name not in OUR_CNNS:  # timm kwargs are kept as given
        assert cfg["dropout"] == kwargs["dropout"]
        assert cfg.get("drop_path_rate") == kwargs.get("drop_path_rate")
    assert "pretrained" not in cfg and "weights" not in cfg
    rebuilt = create_model(**cfg).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert model_config(rebuilt) == cfg
    x = _images(64, chans=kwargs.get("in_chans", 3))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_model_config_follows_reset_classifier() -> None:
    model = create_model(TINY_TIMM, 5, 64)
    model.reset_classifier(11)
    assert model_config(model)["num_classes"] == 11
    ours = create_model("baseline_cnn", 5, 64, **SMALL)
    ours.reset_classifier(11)
    assert create_model(**model_config(ours)).get_classifier().out_features == 11


def test_dropout_reaches_timm_and_options_are_checked() -> None:
    assert create_model(TINY_TIMM, 3, dropout=0.3).drop_rate == 0.3
    with pytest.raises(ConfigError, match="no_such_option"):
        create_model(TINY_TIMM, 3, no_such_option=1)
    with pytest.raises(ConfigError, match="dropout"):
        create_model(TINY_TIMM, 3, dropout=[0.1, 0.2])


def test_resolve_data_config_is_per_model() -> None:
    ours = resolve_data_config("improved_cnn")
    assert ours["mean"] == ours["std"] == (0.5, 0.5, 0.5) and ours["input_size"] == (3, 224, 224)
    model = create_model("baseline_cnn", 3, 96, **SMALL)
    assert resolve_data_config(model)["input_size"] == (3, 96, 96)

    resnet_cfg = timm.models.get_pretrained_cfg("resnet50").to_dict()
    expected = timm.data.resolve_data_config(pretrained_cfg=resnet_cfg)
    by_name = resolve_data_config("resnet50")
    assert by_name["mean"] == tuple(expected["mean"]) != ours["mean"]
    assert by_name["std"] == tuple(expected["std"]) and by_name["interpolation"] == expected["interpolation"]

    tiny = create_model(TINY_TIMM, 3, 64)
    tiny_cfg = resolve_data_config(tiny)
    assert tiny_cfg["mean"] == tuple(timm.data.resolve_data_config(model=tiny)["mean"])
    assert tiny_cfg["input_size"] == (3, 64, 64)  # the size it was built (and will be trained) for
    assert resolve_data_config(tiny, image_size=80)["input_size"] == (3, 80, 80)


def test_count_parameters_trainable_only() -> None:
    model = create_model("baseline_cnn", 3, 32, **SMALL)
    total = count_parameters(model)
    for p in model.features.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in model.features.parameters())
    assert count_parameters(model) == total - frozen
    assert count_parameters(model, trainable_only=False) == total


@pytest.mark.parametrize("name", ["improved_cnn", TINY_TIMM])
def test_seeded_models_depend_on_the_seed_alone(name: str) -> None:
    opts = SMALL if name in OUR_CNNS else {}
    first = create_model(name, 5, 64, seed=7, **opts).state_dict()
    torch.rand(1000)  # advance the global generator: a seeded model must not notice
    torch.manual_seed(12345)
    again = create_model(name, 5, 64, seed=7, **opts).state_dict()
    assert first.keys() == again.keys()
    for key, value in first.items():
        assert torch.equal(value, again[key]), key
    other = create_model(name, 5, 64, seed=8, **opts).state_dict()
    assert any(not torch.equal(value, other[key]) for key, value in first.items() if value.is_floating_point())


def test_a_seeded_model_leaves_the_global_random_state_alone() -> None:
    torch.manual_seed(3)
    before = torch.get_rng_state()
    create_model("baseline_cnn", 5, 64, seed=7, **SMALL)
    assert torch.equal(torch.get_rng_state(), before)
    expected = torch.rand(4)  # the draws that follow are the caller's, as if no model had been built
    torch.manual_seed(3)
    create_model("baseline_cnn", 5, 64, seed=7, **SMALL)
    torch.testing.assert_close(torch.rand(4), expected)
    unseeded = torch.get_rng_state()
    create_model("baseline_cnn", 5, 64, **SMALL)
    assert not torch.equal(torch.get_rng_state(), unseeded)  # without a seed: the global generator, as before


@pytest.mark.gpu
def test_a_seeded_model_leaves_the_cuda_random_state_alone() -> None:
    torch.cuda.manual_seed_all(3)
    before = torch.cuda.get_rng_state_all()
    model = create_model("baseline_cnn", 5, 64, seed=7, **SMALL)
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), before, strict=True))
    assert next(model.parameters()).device.type == "cpu"  # built on the CPU: the generator the seed drives


@pytest.mark.parametrize("seed", [-1, 1.5, True, "7"])
def test_bad_seeds_are_refused(seed: object) -> None:
    with pytest.raises(ConfigError, match="seed"):
        create_model("baseline_cnn", 5, 64, seed=seed, **SMALL)


# --------------------------------------------------------------------------------------------- weights files


def _save_tiny_timm(path: Path, wrap: str | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    state = {prefix + k: v for k, v in timm.create_model(TINY_TIMM, num_classes=1000).state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({wrap: state, "epoch": 3} if wrap else state, path)
    return {k[len(prefix):]: v for k, v in state.items()}


@pytest.mark.parametrize(("filename", "wrap", "prefix"), [
    ("plain.pth", None, ""),
    ("wrapped.pt", "state_dict", ""),
    ("wrapped.pt", "model_state_dict", ""),
    ("wrapped.pt", "model", ""),
    ("ddp.pth", None, "module."),
    ("weights.safetensors", None, ""),
])
def test_weights_file_loads_backbone_and_replaces_the_head(tmp_path: Path, filename: str, wrap: str | None,
                                                           prefix: str) -> None:
    saved = _save_tiny_timm(tmp_path / filename, wrap, prefix)
    model = create_model(TINY_TIMM, 7, 64, weights=tmp_path / filename)
    loaded = model.state_dict()
    head = {"fc.weight", "fc.bias"}
    for key, value in saved.items():
        if key not in head:
            torch.testing.assert_close(loaded[key], value, msg=key)
    assert model.get_classifier().weight.shape == (7, model.num_features)
    assert model(_images(64)).shape == (2, 7)


def test_weights_file_with_the_same_classes_keeps_its_head(tmp_path: Path) -> None:
    source = create_model("improved_cnn", 5, 64, **SMALL)
    torch.save(source.state_dict(), tmp_path / "ours.pt")
    model = create_model("improved_cnn", 5, 64, weights=tmp_path / "ours.pt", **SMALL)
    torch.testing.assert_close(model.get_classifier().weight, source.get_classifier().weight)
    other = create_model("improved_cnn", 8, 64, weights=tmp_path / "ours.pt", **SMALL)
    assert other.get_classifier().weight.shape == (8, 16)
    torch.testing.assert_close(other.features[0].conv.weight, source.features[0].conv.weight)


def test_weights_file_of_another_architecture_is_rejected(tmp_path: Path) -> None:
    torch.save(timm.create_model("test_efficientnet").state_dict(), tmp_path / "effnet.pth")
    with pytest.raises(ConfigError, match=r"effnet\.pth.*test_resnet.*missing: .*unexpected: "):
        create_model(TINY_TIMM, 7, weights=tmp_path / "effnet.pth")
    torch.save(create_model("baseline_cnn", 5, 64, **SMALL).state_dict(), tmp_path / "baseline.pt")
    with pytest.raises(ConfigError, match="missing: features.1.extra"):
        create_model("improved_cnn", 5, 64, weights=tmp_path / "baseline.pt", **SMALL)
    torch.save(create_model("baseline_cnn", 5, 64, head_widths=(32, 8)).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(ConfigError,
                       match=r"shape mismatch: head.1.fc.weight \(file \(8, 32\), model \(16, 32\)\)"):
        create_model("baseline_cnn", 5, 64, weights=tmp_path / "narrow.pt", **SMALL)


def test_unreadable_weights_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        create_model(TINY_TIMM, 3, weights=tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pth"):
        create_model(TINY_TIMM, 3, weights=tmp_path / "junk.pth")
    torch.save({"epoch": 3, "lr": torch.tensor(0.1), "opt": {"x": 1}}, tmp_path / "no_model.pth")
    with pytest.raises(ConfigError, match="state_dict"):
        create_model(TINY_TIMM, 3, weights=tmp_path / "no_model.pth")


def _torchvision_file(tv: nn.Module, path: Path) -> None:
    state = tv.state_dict()
    if type(tv).__name__ == "DenseNet":
        # torchvision's downloadable DenseNet files predate its current names ("norm.1" for "norm1") and
        # BatchNorm's num_batches_tracked; torchvision renames on load, timm has a converter
        state = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))(\d)\.", r"\1.\2.", k): v
                 for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)


# resnet18: same names as timm's; efficientnet_b0: other names, same tensors in the same order;
# densenet121: converted by timm's own torchvision filter
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "densenet121"])
def test_torchvision_state_dicts_give_the_same_features(tmp_path: Path, name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)(num_classes=1000).eval()
    for m in tv.modules():  # non-trivial BN statistics, so a mis-assigned buffer would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    _torchvision_file(tv, tmp_path / f"{name}.pth")
    model = create_model(name, 4, 64, weights=tmp_path / f"{name}.pth").eval()
    x = _images(64)
    with torch.no_grad():
        if name == "resnet18":
            expected = torch.flatten(nn.Sequential(*list(tv.children())[:-1])(x), 1)
        elif name == "densenet121":
            expected = torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(tv.features(x)), 1), 1)
        else:
            expected = torch.flatten(tv.avgpool(tv.features(x)), 1)
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), expected)
    assert model(x).shape == (2, 4)


# ------------------------------------------------------------------------------------ pretrained, offline


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "hf" / "hub"


def test_pretrained_offline_without_cache_fails_fast_with_both_remedies(
        empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("offline mode must not try the network")

    # "fails fast" by construction: no connection is even attempted (no probe, no socket), so no timeout is waited for
    monkeypatch.setattr(pretrained, "_can_connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(CarsmlError) as info:
        create_model(TINY_TIMM, 7, pretrained=True)
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and str(empty_hf_cache) in message
    assert f"timm.create_model('{TINY_TIMM}', pretrained=True)" in message
    assert "~/.cache/huggingface" in message and "weights=<file>" in message


def test_pretrained_without_network_fails_fast(empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(pretrained, "_can_connect", lambda host, port, timeout: False)
    with pytest.raises(CarsmlError, match="(?s)unreachable.*weights=<file>"):
        create_model(TINY_TIMM, 7, pretrained=True)


def test_pretrained_from_a_populated_cache_goes_through_timm(
        empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_id = timm.models.get_pretrained_cfg(TINY_TIMM).hf_hub_id  # e.g. timm/test_resnet.r160_in1k
    repo = empty_hf_cache / f"models--{hub_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    saved = _save_tiny_timm(repo / "snapshots" / commit / "model.safetensors")
    model = create_model(TINY_TIMM, 7, pretrained=True)
    torch.testing.assert_close(model.state_dict()["conv1.0.weight"], saved["conv1.0.weight"])
    assert model.get_classifier().weight.shape == (7, model.num_features)


@pytest.mark.parametrize(("value", "offline"),
                         [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)])
def test_hf_hub_offline_values(monkeypatch: pytest.MonkeyPatch, value: str, offline: bool) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert pretrained._hf_offline() is offline


def test_drop_path_rate_reaches_timm_models_and_is_refused_where_it_cannot_apply() -> None:
    cfg = load_config("transfer", {"model": "test_efficientnet", "pretrained": False, "drop_path_rate": 0.2})
    model = build_model(cfg, 3)
    rates = sorted({m.drop_prob for m in model.modules() if hasattr(m, "drop_prob")})
    assert rates and 0.0 < rates[-1] <= 0.2  # timm spreads the rate over the blocks, up to drop_path_rate
    assert model_config(model)["drop_path_rate"] == 0.2  # and a reloaded model is built with it
    with pytest.raises(ConfigError, match=r"model 'improved_cnn': unknown option\(s\) drop_path_rate"):
        build_model({**load_config("improved", {}), "drop_path_rate": 0.1}, 3)
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(ConfigError, match=r"drop_path_rate: expected a number in \[0, 1\) \(0 = off\), got"):
            build_model({**cfg, "drop_path_rate": bad}, 3)
