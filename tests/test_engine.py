"""The training engine on tiny synthetic data: learning, schedules, selection, checkpoints, callbacks, AMP."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from carsml.data.transforms import build_transform
from carsml.engine import (
    ArrayData,
    Callback,
    FitState,
    RichProgress,
    TrainConfig,
    autocast_dtype,
    evaluate,
    fit,
    iterate_batches,
    predict_probs,
    resolve_device,
    seed_everything,
)
from carsml.engine.checkpoint import load_checkpoint
from carsml.engine.metrics import accuracy, macro_f1, topk_accuracy
from carsml.engine.optim import warmup_cosine_lr
from carsml.engine.train import is_better
from carsml.engine.types import TIMING_KEYS
from carsml.errors import CarsmlError, ConfigError, DataError
from carsml.experiments.train import engine_config

NUM_CLASSES = 4
COLOURS = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30]], dtype=np.uint8)
NONE = build_transform("none")


def make_data(n: int, seed: int = 0, size: int = 16) -> ArrayData:
    """Dark noise with one 8×8 square whose colour is the class: easy to learn, not trivially constant."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    images = rng.integers(0, 60, (n, size, size, 3)).astype(np.uint8)
    for i in range(n):
        r, c = rng.integers(0, size - 8, 2)
        images[i, r : r + 8, c : c + 8] = COLOURS[labels[i]]
    return ArrayData(images, labels.astype(np.int64))


class TinyNet(nn.Module):
    """Conv → BN → pool → conv → GAP → dropout → linear; `fc` is the timm-style classifier."""

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.features(x)))

    def get_classifier(self) -> nn.Module:
        return self.fc


class ConstNet(nn.Module):
    """Fixed logits whatever the input; its parameter gets zero gradient, so nothing it outputs ever changes."""

    def __init__(self, logits: tuple[float, ...] = (2.0, 0.5, 0.0, -1.0)) -> None:
        super().__init__()
        self.fc = nn.Linear(3, NUM_CLASSES)
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3))) * 0.0 + self.logits


def tiny_net(seed: int = 0, **kwargs: float) -> TinyNet:
    seed_everything(seed)
    return TinyNet(**kwargs)


def cfg(**overrides: object) -> TrainConfig:
    base: dict[str, object] = dict(epochs=2, batch_size=32, lr=1e-2, amp="off", device="cpu", log_every_steps=1)
    base.update(overrides)
    return engine_config(**base)


def run(model: nn.Module, c: TrainConfig, train: ArrayData | None = None, val: ArrayData | None = None,
        **kwargs: object):  # fmt: skip
    train = train if train is not None else make_data(128)
    val = val if val is not None else make_data(32, seed=1)
    kwargs.setdefault("train_transform", NONE)
    kwargs.setdefault("eval_transform", NONE)
    return fit(model, train, val, c, **kwargs)  # type: ignore[arg-type]


def strip_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.resumed_history: list[dict] | None = None
        self.errors: list[BaseException] = []
        self.state: FitState | None = None

    def on_fit_start(self, state: FitState) -> None:
        self.state = state
        self.events.append("fit_start")

    def on_resume(self, history: list[dict]) -> None:
        self.resumed_history = history
        self.events.append("resume")

    def on_batch_end(self, epoch: int, step: int, num_steps: int, loss: float, images_per_second: float) -> None:
        assert math.isfinite(loss) and images_per_second > 0
        self.events.append(f"batch:{epoch}:{step}/{num_steps}")

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.events.append(f"epoch:{epoch}")

    def on_fit_end(self, result: object) -> None:
        self.events.append("fit_end")

    def on_fit_error(self, error: BaseException) -> None:
        self.errors.append(error)


class RaiseAt(Callback):
    def __init__(self, epoch: int, error: BaseException) -> None:
        self.epoch, self.error = epoch, error

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch == self.epoch:
            raise self.error


# ---------------------------------------------------------------------------------------------- loader
def test_array_data_subset_read_and_memmap(tmp_path: Path) -> None:
    data = make_data(50)
    mm = np.memmap(tmp_path / "images.u8", dtype=np.uint8, mode="w+", shape=data.images.shape)
    mm[:] = data.images
    mm.flush()
    mm = np.memmap(tmp_path / "images.u8", dtype=np.uint8, mode="r", shape=data.images.shape)
    mapped = ArrayData(mm, data.labels)
    sub = mapped.subset(np.array([40, 3, 17, 8, 9, 10])).subset(np.array([5, 0, 2]))  # rows 10, 40, 17
    images, labels = sub.read(np.arange(3))
    np.testing.assert_array_equal(images, data.images[[10, 40, 17]])
    np.testing.assert_array_equal(labels, data.labels[[10, 40, 17]])
    np.testing.assert_array_equal(sub.targets, data.labels[[10, 40, 17]])
    assert len(sub) == 3


def test_iterate_batches_order_shuffle_and_layout() -> None:
    data = make_data(70).subset(np.arange(69, -1, -1))  # reversed view
    batches = list(iterate_batches(data, 32, shuffle=False, generator=None, device="cpu"))
    assert [len(y) for _, y in batches] == [32, 32, 6]
    x0, y0 = batches[0]
    assert x0.dtype == torch.uint8 and x0.shape == (32, 3, 16, 16) and y0.dtype == torch.int64
    np.testing.assert_array_equal(x0.permute(0, 2, 3, 1).numpy(), data.images[69:37:-1])
    assert x0.is_contiguous()
    x_cl, _ = next(iterate_batches(data, 8, shuffle=False, generator=None, device="cpu", channels_last=True))
    assert x_cl.is_contiguous(memory_format=torch.channels_last)

    def labels_seen(seed: int, **kw: object) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        out = iterate_batches(data, 32, shuffle=True, generator=gen, device="cpu", **kw)  # type: ignore[arg-type]
        return torch.cat([x[:, 0, 0, 0].long() * 1000 + y for x, y in out]).tolist()

    a, b, c = labels_seen(1), labels_seen(1), labels_seen(2)
    assert a == b and a != c
    full = np.sort(data.images[:, 0, 0, 0].astype(np.int64) * 1000 + data.labels)
    np.testing.assert_array_equal(np.sort(a), full)  # every sample exactly once
    assert len(labels_seen(1, drop_last=True)) == 64
    assert len(labels_seen(1, prefetch=False)) == 70


def test_array_data_rejects_bad_input() -> None:
    good = make_data(4)
    with pytest.raises(DataError, match="uint8"):
        ArrayData(good.images.astype(np.float32), good.labels)
    with pytest.raises(DataError, match="labels"):
        ArrayData(good.images, good.labels[:3])
    with pytest.raises(DataError, match=r"\[0, 4\)"):
        good.subset(np.array([0, 4]))


# ---------------------------------------------------------------------------------------------- metrics, evaluate
def test_metrics_match_sklearn() -> None:
    from sklearn.metrics import f1_score, top_k_accuracy_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 300)
    scores = rng.normal(size=(300, 7))
    scores[np.arange(300), labels] += 1.0
    preds = scores.argmax(axis=1)  # may predict class 6, which never occurs in labels
    assert accuracy(preds, labels) == pytest.approx(float(np.mean(preds == labels)))
    assert macro_f1(preds, labels) == pytest.approx(f1_score(labels, preds, average="macro"))
    assert topk_accuracy(scores, labels, 3) == pytest.approx(
        top_k_accuracy_score(labels, scores, k=3, labels=np.arange(7))
    )


def test_evaluate_and_predict_probs_keep_data_order() -> None:
    model = tiny_net()
    data = make_data(40).subset(np.random.default_rng(0).permutation(40))
    res = evaluate(model, data, NONE, batch_size=16, device="cpu", amp="off")
    np.testing.assert_array_equal(res.labels, data.targets)
    assert res.logits.shape == (40, NUM_CLASSES) and res.probs.dtype == np.float32
    np.testing.assert_allclose(res.probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(res.preds, res.logits.argmax(axis=1))
    assert res.acc == pytest.approx(float(np.mean(res.preds == res.labels)))
    expected_loss = F.cross_entropy(torch.from_numpy(res.logits), torch.from_numpy(res.labels)).item()
    assert res.loss == pytest.approx(expected_loss, rel=1e-5)
    probs = predict_probs(model, data, NONE, batch_size=7, amp="off")
    np.testing.assert_allclose(probs, res.probs, rtol=1e-5, atol=1e-6)
    x = torch.from_numpy(data.read(np.arange(40))[0]).permute(0, 3, 1, 2)
    np.testing.assert_allclose(predict_probs(model, x, NONE, batch_size=9, amp="off"), res.probs, atol=1e-6)


# ---------------------------------------------------------------------------------------------- device, config
def test_device_and_amp_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda"):
            resolve_device("cuda")
        if not torch.backends.mps.is_available():
            assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="tpu"):
        resolve_device("tpu")
    assert autocast_dtype("cpu", "auto") == torch.bfloat16
    assert autocast_dtype("cpu", "off") is None
    assert autocast_dtype("cpu", "fp16") == torch.float16
    with pytest.raises(ConfigError, match="fp8"):
        autocast_dtype("cpu", "fp8")


@pytest.mark.parametrize(
    "field, value",
    [("epochs", 0), ("batch_size", 0), ("batch_size", 2.5), ("lr", 0.0), ("lr", -1e-3), ("lr", float("nan")),
     ("optimizer", "rmsprop"), ("scheduler", "step"), ("amp", "fp8"), ("device", "tpu"), ("label_smoothing", 1.0),
     ("head_lr", 0.0), ("warmup_epochs", 1), ("plateau_factor", 1.5), ("early_stopping_patience", -1),
     ("freeze_backbone_epochs", 5), ("eval_batch_size", 0), ("ema_decay", 1.0), ("ema_decay", -0.5),
     ("ema_decay", float("nan")), ("decay_norm_bias", "no"), ("select_on", "test_acc")],
)  # fmt: skip
def test_bad_config_names_field_and_value(field: str, value: object) -> None:
    c = cfg(**{field: value})  # warmup_epochs=1 is invalid because the scheduler is "none"
    with pytest.raises(ConfigError) as info:
        c.validate()
    assert field in str(info.value) and repr(value) in str(info.value)
    rec = Recorder()
    with pytest.raises(ConfigError):
        run(TinyNet(), c, callbacks=[rec])
    assert rec.events == []  # rejected before anything started


def test_labels_beyond_model_classes_are_rejected() -> None:
    with pytest.raises(DataError, match="predicts 3 classes"):
        run(TinyNet(num_classes=3), cfg(epochs=1))


# ---------------------------------------------------------------------------------------------- learning
def test_engine_learns_easy_task() -> None:
    train, val = make_data(256), make_data(64, seed=1)
    res = run(tiny_net(), cfg(epochs=8, lr=1e-2), train=train, val=val)
    assert res.history[-1]["train_acc"] >= 0.95
    assert res.best_val_acc >= 0.95
    assert [h["epoch"] for h in res.history] == list(range(1, 9))
    assert set(res.history[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                                   "epoch_seconds", "images_per_second"}  # fmt: skip


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("scheduler", ["none", "plateau", "cosine"])
def test_each_optimizer_and_scheduler_trains(optimizer: str, scheduler: str) -> None:
    model = tiny_net()
    before = [p.detach().clone() for p in model.parameters()]
    c = cfg(epochs=2, optimizer=optimizer, scheduler=scheduler, weight_decay=1e-4,
            warmup_epochs=1 if scheduler == "cosine" else 0)  # fmt: skip
    res = run(model, c, train=make_data(64))
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in res.history)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_plateau_reduces_lr_when_val_loss_stalls() -> None:
    res = run(ConstNet(), cfg(epochs=4, scheduler="plateau", plateau_patience=0, plateau_factor=0.5))
    assert [h["lr"] for h in res.history] == pytest.approx([1e-2, 1e-2, 5e-3, 2.5e-3])


def test_plateau_patience_and_min_lr() -> None:
    c = cfg(epochs=5, scheduler="plateau", plateau_patience=1, plateau_factor=0.1, min_lr=5e-4)
    res = run(ConstNet(), c)
    assert [h["lr"] for h in res.history] == pytest.approx([1e-2, 1e-2, 1e-2, 1e-3, 1e-3])
    c = cfg(epochs=4, scheduler="plateau", plateau_patience=0, plateau_factor=0.1, min_lr=5e-4)
    assert [h["lr"] for h in run(ConstNet(), c).history] == pytest.approx([1e-2, 1e-2, 1e-3, 5e-4])


def test_warmup_cosine_values() -> None:
    kw = dict(base_lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=12)
    assert warmup_cosine_lr(0, **kw) == pytest.approx(0.25)
    assert warmup_cosine_lr(3, **kw) == pytest.approx(1.0)
    assert warmup_cosine_lr(4, **kw) == pytest.approx(1.0)
    assert warmup_cosine_lr(8, **kw) == pytest.approx(0.55)  # halfway through the decay
    assert warmup_cosine_lr(12, **kw) == pytest.approx(0.1)
    decay = [warmup_cosine_lr(s, **kw) for s in range(4, 13)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))


def test_cosine_schedule_drives_the_optimizer() -> None:
    # 128 samples / 32 = 4 steps per epoch; "lr" is the rate of each epoch's last step.
    c = cfg(epochs=4, scheduler="cosine", warmup_epochs=1, min_lr=1e-4, lr=1e-2)
    res = run(ConstNet(), c)
    expected = [warmup_cosine_lr(4 * e - 1, base_lr=1e-2, min_lr=1e-4, warmup_steps=4, total_steps=16)
                for e in range(1, 5)]  # fmt: skip
    assert [h["lr"] for h in res.history] == pytest.approx(expected)
    assert expected[0] == pytest.approx(1e-2)


def test_early_stopping_stops_after_patience() -> None:
    res = run(ConstNet(), cfg(epochs=10, early_stopping_patience=2))
    assert res.stopped_early
    assert res.epochs_run == 3 and len(res.history) == 3
    assert res.best_epoch == 1


def test_selection_rule_ties_break_on_val_loss() -> None:
    assert is_better(0.8, 1.0, 0.7, 0.5)
    assert is_better(0.8, 0.4, 0.8, 0.5)
    assert not is_better(0.8, 0.5, 0.8, 0.5)
    assert not is_better(0.7, 0.1, 0.8, 0.5)


class ScriptedNet(nn.Module):
    """Predicts class `script[epoch - 1]` for every image after training epoch `epoch`: the epoch it is in is a buffer
    (`phase`, part of the state dict like any weight), set by `PhaseSetter` during that epoch's training steps. Every
    epoch's val and test accuracy is therefore fixed by construction, whatever the machine's numerics."""

    def __init__(self, script: tuple[int, ...] | torch.Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(3, NUM_CLASSES)  # zero gradient: only there so the optimizer has a parameter
        logits = script if isinstance(script, torch.Tensor) else F.one_hot(torch.tensor(script), NUM_CLASSES) * 10.0
        self.register_buffer("script", logits.float())  # one row of logits per epoch
        self.register_buffer("phase", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3))) * 0.0 + self.script[(self.phase - 1).clamp(min=0)]


class PhaseSetter(Callback):
    def __init__(self, model: ScriptedNet) -> None:
        self.model = model

    def on_batch_end(self, epoch: int, step: int, num_steps: int, loss: float, images_per_second: float) -> None:
        self.model.phase.fill_(epoch)


def test_best_epoch_is_chosen_on_val_not_test() -> None:
    images = make_data(48, seed=1)
    # Val and test hold the same images; every val label is class 1 and every test label class 2. The model predicts
    # class 0, 1, 3, 2, 0 after epochs 1..5: val is best at epoch 2 only, test at epoch 4 only, the last epoch is
    # worse than both, so selecting on test, or keeping the last epoch, gives a different answer.
    val = ArrayData(images.images, np.full(48, 1))
    test = ArrayData(images.images, np.full(48, 2))
    model = ScriptedNet((0, 1, 3, 2, 0))
    res = run(model, cfg(epochs=5, lr=2e-3), val=val, test=test, callbacks=[PhaseSetter(model)])
    hist = res.history
    assert [h["val_acc"] for h in hist] == [0, 1, 0, 0, 0] and [h["test_acc"] for h in hist] == [0, 0, 0, 1, 0]
    assert res.best_epoch == 2 and res.best_val_acc == 1.0 and res.best_val_loss == hist[1]["val_loss"]
    assert {"test_loss", "test_acc"} <= set(hist[0])
    # The model is left holding the best epoch's weights (here: its phase buffer), not the last epoch's.
    assert int(model.phase) == 2
    after = evaluate(model, val, NONE, batch_size=64, device="cpu", amp="off")
    assert (after.acc, after.loss) == pytest.approx((res.best_val_acc, res.best_val_loss), rel=1e-6)


def test_select_on_val_loss_keeps_the_lowest_loss_epoch() -> None:
    # every val label is class 1. Epoch 1 gets it right with little confidence; epoch 2 gets it wrong (class 0 by a
    # hair) with class 1 close behind — a lower loss; epoch 3 is wrong and confident.
    logits = torch.tensor([[0.0, 0.5, 0.0, 0.0], [0.6, 0.55, -5.0, -5.0], [5.0, 0.0, 0.0, 0.0]])
    images = make_data(32, seed=1)
    val = ArrayData(images.images, np.full(32, 1))
    by_acc, by_loss = ScriptedNet(logits), ScriptedNet(logits)
    acc = run(by_acc, cfg(epochs=3), val=val, callbacks=[PhaseSetter(by_acc)])
    loss = run(by_loss, cfg(epochs=3, select_on="val_loss"), val=val, callbacks=[PhaseSetter(by_loss)])
    assert [h["val_acc"] for h in loss.history] == [1, 0, 0]
    assert loss.history[1]["val_loss"] < loss.history[0]["val_loss"] < loss.history[2]["val_loss"]
    assert (acc.best_epoch, int(by_acc.phase)) == (1, 1) and (loss.best_epoch, int(by_loss.phase)) == (2, 2)
    assert loss.best_val_loss == loss.history[1]["val_loss"] and loss.best_val_acc == 0


def test_selection_on_a_learning_model_matches_the_val_history() -> None:
    # the same rule on a network that really learns: whichever epoch wins, it is the val argmax (ties broken on val
    # loss) and the returned model evaluates to that epoch's numbers
    images = make_data(48, seed=1)
    val = ArrayData(images.images, (images.labels + 1) % NUM_CLASSES)
    model = tiny_net()
    res = run(model, cfg(epochs=5, lr=2e-3), val=val, test=images)
    best = max(res.history, key=lambda h: (h["val_acc"], -h["val_loss"]))
    assert res.best_epoch == best["epoch"]
    assert res.best_val_acc == best["val_acc"] and res.best_val_loss == best["val_loss"]
    after = evaluate(model, val, NONE, batch_size=64, device="cpu", amp="off")
    assert (after.acc, after.loss) == pytest.approx((res.best_val_acc, res.best_val_loss), rel=1e-6)


def test_same_seed_same_history() -> None:
    study = build_transform("study")
    a = run(tiny_net(1), cfg(epochs=2, seed=3), train_transform=study)
    b = run(tiny_net(1), cfg(epochs=2, seed=3), train_transform=study)
    c = run(tiny_net(1), cfg(epochs=2, seed=4), train_transform=study)
    assert strip_timing(a.history) == strip_timing(b.history)
    assert strip_timing(a.history) != strip_timing(c.history)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_resume_reproduces_uninterrupted_history(tmp_path: Path) -> None:
    study = build_transform("study")
    c = cfg(epochs=4, scheduler="plateau", plateau_patience=0, lr=5e-3)
    full = run(tiny_net(5), c, train_transform=study, checkpoint_dir=tmp_path / "a")

    with pytest.raises(KeyboardInterrupt):
        run(tiny_net(5), c, train_transform=study, checkpoint_dir=tmp_path / "b",
            callbacks=[RaiseAt(2, KeyboardInterrupt())])  # fmt: skip
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 2

    rec = Recorder()
    resumed_model = tiny_net(99)  # different initial weights: everything must come from the checkpoint
    resumed = run(resumed_model, c, train_transform=study, checkpoint_dir=tmp_path / "b", resume=True,
                  callbacks=[rec])  # fmt: skip
    assert rec.resumed_history is not None and [h["epoch"] for h in rec.resumed_history] == [1, 2]
    assert [e for e in rec.events if e.startswith("epoch")] == ["epoch:3", "epoch:4"]
    assert rec.events[:2] == ["fit_start", "resume"] and rec.state is not None and rec.state.start_epoch == 3
    assert strip_timing(resumed.history) == strip_timing(full.history)
    assert resumed.best_epoch == full.best_epoch and resumed.epochs_run == 4
    for key, value in full.best_state_dict.items():
        assert torch.equal(value, resumed.best_state_dict[key]), key


def test_resume_of_finished_fit_runs_nothing(tmp_path: Path) -> None:
    c = cfg(epochs=2)
    first = run(tiny_net(), c, checkpoint_dir=tmp_path)
    rec = Recorder()
    again = run(tiny_net(1), c, checkpoint_dir=tmp_path, resume=True, callbacks=[rec])
    assert not [e for e in rec.events if e.startswith(("epoch", "batch"))]
    assert again.history == first.history and again.best_epoch == first.best_epoch


def test_checkpoint_written_before_on_epoch_end(tmp_path: Path) -> None:
    seen: list[tuple[int, int, int]] = []

    class Check(Callback):
        def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
            last = load_checkpoint(tmp_path / "last.pt")
            assert last["history"][-1]["val_acc"] == metrics["val_acc"]
            seen.append((epoch, last["epoch"], load_checkpoint(tmp_path / "best.pt")["epoch"]))

    res = run(tiny_net(), cfg(epochs=3), checkpoint_dir=tmp_path, callbacks=[Check()])
    assert [s[:2] for s in seen] == [(1, 1), (2, 2), (3, 3)]
    assert seen[-1][2] == res.best_epoch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temp files left


def test_resume_errors(tmp_path: Path) -> None:
    with pytest.raises(CarsmlError, match="not found"):
        run(tiny_net(), cfg(), checkpoint_dir=tmp_path / "none", resume=True)
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        run(tiny_net(), cfg(), resume=True)
    run(tiny_net(), cfg(epochs=1), checkpoint_dir=tmp_path)
    with pytest.raises(CarsmlError, match=r"different model.*fc\.weight"):
        run(TinyNet(num_classes=5), cfg(epochs=2), checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CarsmlError, match="lr: checkpoint 0.01 vs now 0.02"):
        run(tiny_net(), cfg(epochs=2, lr=2e-2), checkpoint_dir=tmp_path, resume=True)
    (tmp_path / "last.pt").write_bytes(b"garbage")
    with pytest.raises(CarsmlError, match="cannot be read"):
        run(tiny_net(), cfg(epochs=2), checkpoint_dir=tmp_path, resume=True)


# ---------------------------------------------------------------------------------------------- callbacks
def test_callback_order() -> None:
    rec = Recorder()
    run(tiny_net(), cfg(epochs=2, log_every_steps=3), callbacks=[rec])  # 4 steps per epoch
    assert rec.events == ["fit_start", "batch:1:3/4", "batch:1:4/4", "epoch:1", "batch:2:3/4", "batch:2:4/4",
                          "epoch:2", "fit_end"]  # fmt: skip
    assert rec.state is not None and rec.state.num_classes == NUM_CLASSES and not rec.state.resumed


def test_callback_exception_propagates() -> None:
    class Pruned(Exception):
        pass

    before, after = Recorder(), Recorder()
    with pytest.raises(Pruned):
        run(tiny_net(), cfg(epochs=3), callbacks=[before, RaiseAt(1, Pruned()), after])
    assert before.events[-1] == "epoch:1" and "epoch:1" not in after.events
    assert "fit_end" not in before.events
    assert len(before.errors) == 1 and isinstance(before.errors[0], Pruned)


def test_rich_progress_quiet_without_terminal() -> None:
    out = io.StringIO()
    run(tiny_net(), cfg(epochs=2), callbacks=[RichProgress(Console(file=out, force_terminal=False))])
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("epoch 1/2") and "val loss" in lines[0] and lines[2].startswith("best epoch")
    term = io.StringIO()
    run(tiny_net(), cfg(epochs=1), callbacks=[RichProgress(Console(file=term, force_terminal=True, width=120))])
    assert "epoch 1/1" in term.getvalue()


def test_one_progress_bar_spans_every_fit_of_a_job() -> None:
    from carsml.progress import job_plan, planned_fits

    term = io.StringIO()
    console = Console(file=term, force_terminal=True, width=160)
    with planned_fits(3, "fold") as plan:
        for _ in range(3):
            run(tiny_net(), cfg(epochs=1), callbacks=[RichProgress(console)])
        assert plan.done == 3 and plan.progress is None  # the bar ends with the job's last fit
    shown = term.getvalue()
    assert "fold 1/3 · epoch 1/1" in shown and "fold 3/3 · epoch 1/1" in shown and "ETA" in shown
    assert job_plan().fits == 1  # the plan ends with the block


def test_a_long_job_on_a_cpu_says_so_after_its_first_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    from carsml.engine import callbacks

    out = io.StringIO()
    monkeypatch.setattr(callbacks, "LONG_JOB_SECONDS", -1.0)  # any estimate counts as long
    run(tiny_net(), cfg(epochs=3), callbacks=[RichProgress(Console(file=out, force_terminal=False))])
    notes = [line for line in out.getvalue().splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and callbacks.QUICK_FLAGS in notes[0] and "more minutes on this CPU" in notes[0]
    quiet = io.StringIO()
    monkeypatch.setattr(callbacks, "LONG_JOB_SECONDS", 1e9)
    run(tiny_net(), cfg(epochs=3), callbacks=[RichProgress(Console(file=quiet, force_terminal=False))])
    assert "note:" not in quiet.getvalue()


# ---------------------------------------------------------------------------------------------- training options
class DtypeProbe(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        self.seen.add(out.dtype)
        return out


def test_amp_bf16_on_cpu() -> None:
    seed_everything(0)
    model = DtypeProbe()
    res = run(model, cfg(epochs=1, amp="bf16"))
    assert model.seen == {torch.bfloat16}
    assert math.isfinite(res.history[0]["train_loss"]) and math.isfinite(res.history[0]["val_loss"])


def test_label_smoothing_changes_the_loss_as_defined() -> None:
    train = make_data(128)
    logits = ConstNet().logits.expand(128, -1)
    labels = torch.from_numpy(train.labels)
    for smoothing in (0.0, 0.2):
        res = run(ConstNet(), cfg(epochs=1, label_smoothing=smoothing), train=train)
        expected = F.cross_entropy(logits, labels, label_smoothing=smoothing).item()
        assert res.history[0]["train_loss"] == pytest.approx(expected, rel=1e-5)
        # Validation loss is plain cross-entropy whatever the training smoothing.
        assert res.history[0]["val_loss"] == pytest.approx(res.best_val_loss)


def test_grad_clip_bounds_the_update() -> None:
    def update_norm(clip: float) -> float:
        model = tiny_net(0, dropout=0.0)
        before = [p.detach().clone() for p in model.parameters()]
        run(model, cfg(epochs=1, batch_size=128, optimizer="sgd", momentum=0.0, lr=1.0, grad_clip=clip))
        deltas = [float((p.detach() - b).pow(2).sum()) for p, b in zip(model.parameters(), before, strict=True)]
        return math.sqrt(sum(deltas))

    assert update_norm(0.0) > 0.01  # without clipping the single SGD step is large
    assert 0 < update_norm(1e-3) <= 1e-3 * 1.001  # lr 1 × gradient norm clipped to 1e-3


def test_freeze_backbone_then_unfreeze() -> None:
    model = tiny_net()
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    snapshots: list[dict[str, torch.Tensor]] = []

    class Snap(Callback):
        def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
            snapshots.append({k: v.detach().clone() for k, v in model.named_parameters()})

    run(model, cfg(epochs=2, freeze_backbone_epochs=1), callbacks=[Snap()])
    for name, value in snapshots[0].items():
        changed = not torch.equal(value, initial[name])
        assert changed == name.startswith("fc."), name  # only the head moves while the backbone is frozen
    assert not torch.equal(snapshots[1]["features.0.weight"], initial["features.0.weight"])
    assert all(p.requires_grad for p in model.parameters())


def test_head_lr_sets_a_separate_group_rate() -> None:
    res = run(tiny_net(), cfg(epochs=1, lr=1e-3, head_lr=2e-2))
    assert res.history[0]["lr"] == pytest.approx(1e-3)
    assert res.history[0]["lr_head"] == pytest.approx(2e-2)
    with pytest.raises(ConfigError, match="get_classifier"):
        run(ConstNet(), cfg(epochs=1, head_lr=2e-2))


def test_strong_policy_with_mixup_and_cutmix_trains() -> None:
    strong = build_transform("strong", mixup=0.2, cutmix=1.0)
    res = run(tiny_net(), cfg(epochs=2, label_smoothing=0.1), train_transform=strong)
    assert all(math.isfinite(h["train_loss"]) for h in res.history)


def test_small_train_set_uses_one_partial_batch() -> None:
    rec = Recorder()
    res = run(tiny_net(), cfg(epochs=1, batch_size=64), train=make_data(20), callbacks=[rec])
    assert "batch:1:1/1" in rec.events
    assert res.history[0]["train_acc"] * 20 == pytest.approx(round(res.history[0]["train_acc"] * 20))


# ------------------------------------------------------------------------------------------ the carsml recipe's parts
def test_ema_is_what_is_evaluated_selected_and_returned() -> None:
    model = tiny_net()
    rec = Recorder()
    res = run(model, cfg(epochs=3, ema_decay=0.9), callbacks=[rec])
    # the returned model holds the averaged weights of the best epoch: evaluating it gives that epoch's val numbers
    after = evaluate(model, make_data(32, seed=1), NONE, batch_size=64, device="cpu", amp="off")
    assert (after.acc, after.loss) == pytest.approx((res.best_val_acc, res.best_val_loss), rel=1e-6)
    # and it is not the raw weights of the same training (the same seed without EMA)
    raw = tiny_net()
    run(raw, cfg(epochs=3))
    assert not torch.equal(raw.fc.weight, model.fc.weight)


def test_ema_average_follows_the_warmed_up_decay() -> None:
    from carsml.engine.ema import WeightEMA

    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = WeightEMA(net, 0.5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)  # update 1: decay min(0.5, 2 / 11) = 2/11 -> average 9/11 of the new value
    assert ema.state["weight"].flatten().tolist() == pytest.approx([9 / 11] * 2)
    with ema.applied(net):
        assert torch.equal(net.weight, ema.state["weight"])
    assert torch.equal(net.weight, torch.ones(1, 2))  # the model's own weights come back


def test_resume_with_ema_reproduces_uninterrupted_history(tmp_path: Path) -> None:
    c = cfg(epochs=3, lr=5e-3, ema_decay=0.95)
    full = run(tiny_net(5), c, checkpoint_dir=tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tiny_net(5), c, checkpoint_dir=tmp_path / "b", callbacks=[RaiseAt(1, KeyboardInterrupt())])
    resumed = run(tiny_net(99), c, checkpoint_dir=tmp_path / "b", resume=True)
    assert strip_timing(resumed.history) == strip_timing(full.history)
    for key, value in full.best_state_dict.items():
        assert torch.equal(value, resumed.best_state_dict[key]), key


def test_decay_norm_bias_false_exempts_one_dimensional_parameters() -> None:
    from carsml.engine.optim import make_optimizer

    model = TinyNet()
    c = cfg(optimizer="adamw", weight_decay=0.05, decay_norm_bias=False)
    groups = make_optimizer(c, [{"params": list(model.parameters())}]).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    exempt = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters() if p.ndim > 1}
    assert exempt == {id(p) for p in model.parameters() if p.ndim <= 1}  # biases and BatchNorm weights
    default = make_optimizer(cfg(optimizer="adamw", weight_decay=0.05), [{"params": list(model.parameters())}])
    assert [g["weight_decay"] for g in default.param_groups] == [0.05]  # the study's L2 on everything


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_cpu_optimizers_use_the_fused_kernel_with_the_same_update_rule(optimizer: str) -> None:
    from carsml.engine.optim import make_optimizer

    c = cfg(optimizer=optimizer, weight_decay=0.05, decay_norm_bias=False)

    def net() -> nn.Module:  # no bias in front of a norm: a zero gradient would make Adam's step pure rounding noise
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))

    fused_model, model = net(), net()
    opt = make_optimizer(c, [{"params": list(fused_model.parameters())}])
    assert all(g["fused"] for g in opt.param_groups)
    reference = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer](
        [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in make_optimizer(
            c, [{"params": list(model.parameters())}]).param_groups], lr=c.lr,
        **({"momentum": c.momentum} if optimizer == "sgd" else {}), foreach=False)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for trained, o in ((fused_model, opt), (model, reference)):
        for _ in range(3):
            o.zero_grad()
            trained(x).logsumexp(dim=1).mean().backward()
            o.step()
    for a, b in zip(fused_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_refit_without_validation_keeps_the_last_epoch() -> None:
    model = ScriptedNet((0, 1, 3))
    test = ArrayData(make_data(16).images, np.full(16, 3))
    res = fit(model, make_data(128), None, cfg(epochs=3), train_transform=NONE, eval_transform=NONE, test=test,
              callbacks=[PhaseSetter(model)])
    assert res.best_epoch == 3 and int(model.phase) == 3 and math.isnan(res.best_val_acc)
    assert all("val_acc" not in h for h in res.history) and [h["test_acc"] for h in res.history] == [0, 0, 1]
    for scheduler, patience in (("plateau", 0), ("none", 2)):
        with pytest.raises(ConfigError, match="without a validation set"):
            fit(TinyNet(), make_data(64), None, cfg(scheduler=scheduler, early_stopping_patience=patience),
                train_transform=NONE, eval_transform=NONE)


def test_train_images_larger_than_the_model_input() -> None:
    # the training cache may be larger (cache_scale): the train transform produces the evaluation size
    big = make_data(64, size=24)
    res = run(tiny_net(), cfg(epochs=1), train=big, train_transform=build_transform("crop", size=16))
    assert res.epochs_run == 1
    with pytest.raises(DataError, match="val and test must have the same image size"):
        run(tiny_net(), cfg(epochs=1), test=big)
