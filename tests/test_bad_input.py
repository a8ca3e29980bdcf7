"""Bad input the user can give, each refused with one clear error naming the file / field / value and what was expected,
before any work starts where possible and leaving nothing half-written: a diverging loss, an unusable tracking URI,
bad class names, empty or non-UTF-8 CSVs, zero-byte and multi-frame images, and serving requests with bad rows."""

from __future__ import annotations

import base64
import io
import re
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn

from carsml.cli import run_experiment
from carsml.data.cache import build_cache
from carsml.data.images import load_crop, open_rgb, read_header
from carsml.data.readers import load_dataset
from carsml.data.transforms import build_transform
from carsml.engine import ArrayData, fit
from carsml.errors import CarsmlError, ConfigError, DataError
from carsml.experiments.train import engine_config
from carsml.tracking.pyfunc_model import CarsImageClassifier, decode_images
from carsml.tracking.runs import check_tracking_uri
from tests.conftest import TINY
from tests.test_readers import TRAIN, _devkit

NONE = build_transform("none")


# ------------------------------------------------------------------------------------------------------------
# 1. A diverging loss


class BlowUp(nn.Module):
    """Two-class logits from the mean colour; training forward call `at` (1-based) adds `value` to class 0's logit
    (-inf: that batch's loss is inf, gradients stay finite; nan: loss and then the weights turn NaN). With
    `eval_nan`, evaluation after the first training step returns NaN logits (the weights "broke" on the last
    step, after the train loss was computed)."""

    def __init__(self, value: float = 0.0, at: int = 0, eval_nan: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.value, self.at, self.eval_nan, self.calls = value, at, eval_nan, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(x.float().mean(dim=(2, 3)))
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                logits = logits + torch.tensor([self.value, 0.0])
        elif self.eval_nan and self.calls:
            logits = logits * float("nan")
        return logits


def _data(n: int, seed: int = 0, all_zero: bool = False) -> ArrayData:
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, dtype=np.int64) if all_zero else rng.integers(0, 2, n)
    return ArrayData(rng.integers(0, 255, (n, 8, 8, 3)).astype(np.uint8), labels)


@pytest.mark.parametrize("value, shown", [(float("-inf"), "inf"), (float("nan"), "nan")])
def test_nan_and_inf_train_loss_are_caught_by_the_end_of_the_epoch(value: float, shown: str) -> None:
    # 3 steps per epoch, the loss check every 1000 steps: the bad step 2 is inside a window, so only the check
    # after the epoch's last step can see it
    model = BlowUp(value, at=2)
    cfg = engine_config(epochs=3, batch_size=4, lr=0.01, amp="off", device="cpu", log_every_steps=1000)
    with pytest.raises(CarsmlError, match=rf"training diverged: train loss is {shown} at epoch 1 step 3; lower "
                                          r"TrainConfig.lr \(now 0.01\) or enable grad_clip"):
        fit(model, _data(12, all_zero=True), _data(8, 1), cfg, train_transform=NONE, eval_transform=NONE)
    assert model.calls == 3  # stopped at the end of the first epoch, not later


def test_non_finite_val_loss_after_a_finite_train_loss_is_divergence(tmp_path: Path) -> None:
    cfg = engine_config(epochs=3, batch_size=4, lr=0.01, amp="off", device="cpu")
    with pytest.raises(CarsmlError, match=r"training diverged: val loss is nan after epoch 1 \(train loss "
                                          r"[0-9.]+\): the model no longer gives finite outputs"):
        fit(BlowUp(eval_nan=True), _data(12), _data(8, 1), cfg, train_transform=NONE, eval_transform=NONE,
            checkpoint_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # the diverged epoch was never checkpointed (nor selected as best)


@pytest.mark.slow
def test_a_diverging_run_fails_from_the_entry_point_and_its_mlflow_run_is_failed() -> None:
    with pytest.raises(CarsmlError, match=r"training diverged: .* lower TrainConfig.lr \(now 1000000.0\)"):
        run_experiment("improved", {**TINY, "lr": 1e6})
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    assert runs[0].info.status == "FAILED"
    assert runs[0].data.tags["carsml.error"].startswith("CarsmlError: training diverged")


# ------------------------------------------------------------------------------------------------------------
# 2. An unusable MLFLOW_TRACKING_URI


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the dataset or training fails the test: the URI must be refused before either."""
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the tracking URI was checked")

    monkeypatch.setattr("carsml.experiments.train.resolve_dataset", forbidden)
    monkeypatch.setattr("carsml.experiments.train.fit", forbidden)


@pytest.mark.parametrize("uri, fragment", [
    ("http://127.0.0.1:9", "the tracking server is unreachable (GET http://127.0.0.1:9/health: "),
    ("htp:/bad", "unsupported scheme 'htp:'"),
    ("http:/bad", "no host name"),
    ("http://localhost:notaport", "the port is not a number in 0..65535"),
    ("sqlite:///{tmp}/no-such-dir/x.db", "the folder {tmp}/no-such-dir of the SQLite file does not exist"),
    ("sqlite:///{tmp}/not-a-db.txt", "{tmp}/not-a-db.txt is not an SQLite database"),
])
def test_unusable_tracking_uri_fails_at_once_naming_it(uri: str, fragment: str, isolated: Path, no_work: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    uri, fragment = uri.format(tmp=isolated), fragment.format(tmp=isolated)
    (isolated / "not-a-db.txt").write_text("some notes\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        run_experiment("improved", dict(TINY))
    assert time.monotonic() - start < 10  # not MLflow's minutes of retries
    message = str(info.value)
    assert message.startswith(f"MLFLOW_TRACKING_URI={uri!r}: ") and fragment in message
    assert "unset MLFLOW_TRACKING_URI to log to sqlite:///mlflow.db" in message
    assert not (isolated / "no-such-dir").exists() and not (isolated / "mlflow.db").exists()


def test_tracking_server_that_never_answers_times_out_fast_and_hides_the_password() -> None:
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(ConfigError, match=r"unreachable .*no answer within 3 s") as info:
            check_tracking_uri(f"http://user:secret@127.0.0.1:{port}")
    assert time.monotonic() - start < 8
    assert "secret" not in str(info.value) and f"'http://user:***@127.0.0.1:{port}'" in str(info.value)


# ------------------------------------------------------------------------------------------------------------
# 3. / 4. Class names and the Kaggle CSVs


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)
    return path


def _kaggle(root: Path, names: str, classes: tuple[str, ...] = ("A",)) -> Path:
    """A Kaggle-layout tree: `names` as names.csv, and one image per class of `classes` (class ids 1, 2, ...) in
    anno_train.csv and train/<class folder>/."""
    (root / "names.csv").write_text(names)
    lines = []
    for i, name in enumerate(classes, 1):
        _image(root / "train" / name.replace("/", "-") / f"{i:05d}.jpg")
        lines.append(f"{i:05d}.jpg,1,1,8,8,{i}\n")
    (root / "anno_train.csv").write_text("".join(lines))
    return root


@pytest.mark.parametrize("names, message", [
    ("A\nB\nA\nC\nB\n", r"names.csv: 2 class name\(s\) occur more than once: 'A' \(line 1 and line 3\), "
                        r"'B' \(line 2 and line 5\); expected distinct names"),
    ("A\n\nB\n", r"names.csv: 1 empty class name\(s\), at line 2; expected one non-empty name per class id"),
    (" \nA\n", r"names.csv: 1 empty class name\(s\), at line 1"),
    ("A\nRam C/V\nRam C-V\n", r"names.csv: 1 group\(s\) of class names give the same image folder once '/' "
                              r"becomes '-': 'Ram C/V' \(line 2\) and 'Ram C-V' \(line 3\) -> 'Ram C-V'; expected "
                              r"distinct folder names"),
])
def test_bad_class_names_in_names_csv(tmp_path: Path, names: str, message: str) -> None:
    lines = names.splitlines()
    _kaggle(tmp_path, names, classes=tuple(lines) if all(lines) and len(set(lines)) == len(lines) else ("A",))
    with pytest.raises(DataError, match=message) as info:
        load_dataset(tmp_path)
    assert str(tmp_path / "names.csv") in str(info.value)


def test_trailing_blank_lines_in_names_csv_are_fine(tmp_path: Path) -> None:
    ds = load_dataset(_kaggle(tmp_path, "A\r\nB\r\n\r\n\n", classes=("A", "B")))
    assert ds.class_names == ["A", "B"] and ds.layout == "kaggle_folders"


@pytest.mark.parametrize("names, message", [
    (("A", "B/C", "A"), r"cars_meta.mat: 1 class name\(s\) occur more than once: 'A' \(entry 1 and entry 3\)"),
    (("A", " ", "D"), r"cars_meta.mat: 1 empty class name\(s\), at entry 2"),
])
def test_bad_class_names_in_cars_meta(tmp_path: Path, names: tuple[str, ...], message: str) -> None:
    _devkit(tmp_path, TRAIN, None, names=names)
    with pytest.raises(DataError, match=message):
        load_dataset(tmp_path)


@pytest.mark.parametrize("file, content, message", [
    ("names.csv", b"", r"names.csv: the file is empty \(0 bytes\); expected a CSV file of class names, one per line"),
    ("anno_train.csv", b"", r"anno_train.csv: the file is empty \(0 bytes\); expected a CSV file of annotation "
                            r"lines 'fname,x1,y1,x2,y2,class'"),
    ("anno_train.csv", b"image,x1,y1,x2,y2,class\n", r"anno_train.csv: only a header line and no annotation rows; "
                                                     r"expected at least one line 'fname,x1,y1,x2,y2,class'"),
    ("anno_train.csv", b"\n \n", r"anno_train.csv: no annotation rows; expected at least one line"),
    ("names.csv", "A\nCitro\u00ebn C4\n".encode("latin-1"),
     r"names.csv: line 2 is not UTF-8 text \(byte 0xeb at character 6\); expected a UTF-8 CSV file of class "
     r"names.*Re-save it as UTF-8"),
    ("anno_train.csv", "00001.jpg,1,1,8,8,1\n\u00e9t\u00e9.jpg,1,1,8,8,1\n".encode("latin-1"),
     r"anno_train.csv: line 2 is not UTF-8 text \(byte 0xe9 at character 1\)"),
])
def test_empty_and_non_utf8_kaggle_csvs(tmp_path: Path, file: str, content: bytes, message: str) -> None:
    _kaggle(tmp_path, "A\n")
    (tmp_path / file).write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(tmp_path)
    assert str(tmp_path / file) in str(info.value)


def test_anno_test_csv_is_checked_like_anno_train(tmp_path: Path) -> None:
    _kaggle(tmp_path, "A\n")
    (tmp_path / "anno_test.csv").write_bytes(b"")
    with pytest.raises(DataError, match=r"anno_test.csv: the file is empty \(0 bytes\)"):
        load_dataset(tmp_path)


# ------------------------------------------------------------------------------------------------------------
# 5. Zero-byte and multi-frame images


def test_zero_byte_image_is_named_everywhere(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.touch()
    for read in (open_rgb, read_header, lambda p: load_crop(p, None, 8)):
        with pytest.raises(DataError, match=rf"{empty}: the file is empty \(0 bytes\); expected an image"):
            read(empty)
    # class_folders reads every header while listing the dataset, so the file is named before any work
    _image(tmp_path / "data" / "train" / "a" / "good.jpg")
    (tmp_path / "data" / "train" / "a" / "bad.jpg").touch()
    with pytest.raises(DataError, match=r"bad.jpg: the file is empty \(0 bytes\)"):
        load_dataset(tmp_path / "data")


def test_zero_byte_image_in_the_decoded_cache_fails_or_is_skipped(tmp_path: Path) -> None:
    root = _devkit(tmp_path / "devkit-data", TRAIN, None)
    (root / "cars_train" / "00002.jpg").write_bytes(b"")
    rows = load_dataset(root).split("train")
    with pytest.raises(DataError, match=r"1 image\(s\) could not be decoded \(pass skip_unreadable=true.*\n.*"
                                        r"00002.jpg: the file is empty \(0 bytes\)"):
        build_cache(rows, 8, cache_dir=tmp_path / "cache", use_boxes=False)
    assert not list((tmp_path / "cache" / "decoded").iterdir())  # nothing half-written
    kept = build_cache(rows, 8, cache_dir=tmp_path / "cache", use_boxes=False, skip_unreadable=True)
    assert len(kept.images) == 2 and [Path(p).name for p, _ in kept.skipped] == ["00002.jpg"]
    assert "the file is empty (0 bytes)" in kept.skipped[0][1]


def _frames(path: Path, sizes: list[tuple[int, int]]) -> Path:
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    frames = [Image.new("RGB", size, colour) for size, colour in zip(sizes, colours, strict=False)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    return path


@pytest.mark.parametrize("name, sizes", [
    ("animated.gif", [(20, 10), (20, 10), (20, 10)]),
    ("multipage.tiff", [(20, 10), (30, 40), (5, 5)]),
    ("animated.png", [(20, 10), (20, 10)]),
])
def test_multi_frame_images_are_read_as_their_first_frame(tmp_path: Path, name: str,
                                                          sizes: list[tuple[int, int]]) -> None:
    path = _frames(tmp_path / name, sizes)
    with Image.open(path) as img:
        assert img.n_frames == len(sizes)  # really multi-frame
    assert read_header(path)[:2] == (20, 10)  # the first frame's size
    assert open_rgb(path).getpixel((0, 0)) == (255, 0, 0)
    crop = load_crop(path, (0, 0, 10, 10), 4)
    assert crop.shape == (4, 4, 3) and (crop == [255, 0, 0]).all()


# ------------------------------------------------------------------------------------------------------------
# 6. Serving: a request mixing good and bad rows


def _png_b64(colour: tuple[int, int, int] = (10, 200, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (12, 9), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def test_a_request_with_good_and_bad_rows_is_refused_as_a_whole_naming_the_bad_rows() -> None:
    frame = pd.DataFrame({"image": [_png_b64(), "not base64 !!!", _png_b64(), None]})
    classifier = CarsImageClassifier()
    classifier.size = 8
    with pytest.raises(MlflowException) as info:
        classifier.decode_frame(frame)
    error = info.value
    assert error.error_code == "INVALID_PARAMETER_VALUE" and error.get_http_status_code() == 400
    assert error.message.startswith("2 of 4 row(s) have a bad `image` (row 1, 3); the request was refused as a "
                                    "whole, nothing was predicted: ")
    assert "row 1: `image` is not valid base64" in error.message
    assert "row 3: `image` must be the non-empty bytes of a JPEG or PNG file" in error.message
    assert "row 0" not in error.message and "row 2" not in error.message
    good = decode_images(frame["image"].iloc[[0, 2]], 8)  # the good rows alone decode
    assert good.shape == (2, 8, 8, 3) and good.dtype == np.uint8


def test_many_bad_rows_are_all_listed_and_the_first_ones_explained() -> None:
    with pytest.raises(MlflowException) as info:
        decode_images([_png_b64()] + ["%%%"] * 12, 8)
    message = info.value.message
    assert "12 of 13 row(s) have a bad `image` (row 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)" in message
    assert "row 10: `image` is not valid base64" in message and "row 11:" not in message
    assert message.endswith("; ... (2 more)")


@pytest.mark.parametrize("widths", ["512,abc", "512,-1", "0", "1.5"])
def test_malformed_head_widths_name_the_option_in_one_line(widths: str) -> None:
    with pytest.raises(ConfigError, match=rf"^head_widths \(--head-widths\): expected comma-separated positive "
                                          rf"integers such as 512,256, got '{re.escape(widths)}'$"):
        run_experiment("improved", {"head_widths": widths, "device": "cpu"})
