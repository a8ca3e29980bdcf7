"""The synthetic dataset: devkit layout readable by torchvision, parameters, determinism, quirks, cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io as sio
from PIL import Image

from carsml.data import synthetic
from carsml.data.synthetic import class_names, ensure_synthetic, generate_synthetic
from carsml.errors import ConfigError

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stanford_cars"

SMALL = dict(num_classes=4, images_per_class=8, test_fraction=0.25, frame_size=(64, 48), seed=3,
             extra_class_images=5, extra_class_name="TRUCKS", grayscale_fraction=0.25)
TINY = dict(num_classes=3, images_per_class=3, frame_size=(48, 32), extra_class_images=2,
            grayscale_fraction=0.0)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small")
    generate_synthetic(out, **SMALL)
    return out


def annotations(root: Path, rel: str) -> np.ndarray:
    return sio.loadmat(root / rel, squeeze_me=True)["annotations"]


def files_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_torchvision_loads_both_splits(small: Path) -> None:
    from torchvision.datasets import StanfordCars

    meta = sio.loadmat(small / "stanford_cars" / "devkit" / "cars_meta.mat", squeeze_me=True)
    names = [str(n) for n in meta["class_names"]]
    train = StanfordCars(root=str(small), split="train")
    test = StanfordCars(root=str(small), split="test")
    assert (len(train), len(test)) == (4 * 6, 4 * 2)
    assert train.classes == names == class_names(4, seed=3)
    for ds, n in ((train, 6), (test, 2)):
        labels = [t for _, t in ds]
        assert sorted(set(labels)) == [0, 1, 2, 3]
        assert all(labels.count(c) == n for c in range(4))
    img, target = test[0]
    assert img.mode == "RGB" and img.size == (64, 48) and 0 <= target < 4


def test_layout_and_params_respected(small: Path) -> None:
    root = small / "stanford_cars"
    meta = json.loads((root / "synthetic.json").read_text())
    assert meta["params"] == {**SMALL, "frame_size": [64, 48]}
    counts = meta["counts"]
    assert (counts["classes"], counts["train"], counts["test"], counts["extra"]) == (4, 24, 8, 5)
    assert [c["name"] for c in meta["classes"]] == class_names(4, seed=3)
    for split, n in (("train", 24), ("test", 8)):
        fnames = sorted(p.name for p in (root / f"cars_{split}").iterdir())
        assert fnames == [f"{i:05d}.jpg" for i in range(1, n + 1)]
        assert all(Image.open(root / f"cars_{split}" / f).size == (64, 48) for f in fnames)
    # The annotation files list every image in fname order, and both test files agree.
    for rel, n in (("devkit/cars_train_annos.mat", 24), ("cars_test_annos_withlabels.mat", 8)):
        assert [str(f) for f in annotations(root, rel)["fname"]] == [f"{i:05d}.jpg" for i in range(1, n + 1)]
    plain = annotations(root, "devkit/cars_test_annos.mat")
    labelled = annotations(root, "cars_test_annos_withlabels.mat")
    assert "class" not in plain.dtype.names
    for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "fname"):
        assert [str(v) for v in plain[f]] == [str(v) for v in labelled[f]]
    # Classes interleave in the file order, like the real set (not 1,1,1,...,2,2,2).
    labels = [int(c) for c in annotations(root, "devkit/cars_train_annos.mat")["class"]]
    assert labels != sorted(labels)


def test_mat_structure_mirrors_the_real_devkit(small: Path) -> None:
    ours = small / "stanford_cars"
    train = sio.loadmat(ours / "devkit" / "cars_train_annos.mat")["annotations"]
    names = sio.loadmat(ours / "devkit" / "cars_meta.mat")["class_names"]
    assert names.shape == (1, 4) and names.dtype == object
    assert train.shape == (1, 24)
    for row in train[0]:
        for field in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class"):
            v = row[field]
            assert v.shape == (1, 1)
            assert v.dtype == (np.uint8 if int(v[0, 0]) < 256 else np.uint16)
    assert synthetic._mat_int(300).dtype == np.uint16  # the quirk for values that do not fit a uint8
    if not REAL.is_dir():
        pytest.skip(f"real devkit files not found at {REAL}")
    mats = ("devkit/cars_train_annos.mat", "devkit/cars_test_annos.mat", "cars_test_annos_withlabels.mat")
    for rel in mats:
        real_rel = rel if rel.startswith("devkit") else f"devkit/{rel}"
        real = sio.loadmat(REAL / real_rel)["annotations"]
        assert sio.loadmat(ours / rel)["annotations"].dtype == real.dtype, rel
    real_names = sio.loadmat(REAL / "devkit" / "cars_meta.mat")["class_names"]
    assert type(names[0, 0]) is type(real_names[0, 0]) and names[0, 0].shape == real_names[0, 0].shape


def test_boxes_are_one_based_and_inside_the_frame(small: Path) -> None:
    root = small / "stanford_cars"
    for rel in ("devkit/cars_train_annos.mat", "cars_test_annos_withlabels.mat"):
        a = annotations(root, rel)
        x1, y1, x2, y2 = (a[f].astype(int) for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
        assert (x1 >= 1).all() and (y1 >= 1).all() and (x2 <= 64).all() and (y2 <= 48).all()
        assert (x2 > x1 + 8).all() and (y2 > y1 + 4).all()


def test_edge_boxes_touch_the_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synthetic, "EDGE_FRACTION", 1.0)
    out = tmp_path / "d"
    root = generate_synthetic(out, **TINY)
    a = annotations(root, "devkit/cars_train_annos.mat")
    for row in a:
        x1, y1, x2, y2 = (int(row[f]) for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
        assert x1 == 1 or x2 == 48 or y2 == 32, (x1, y1, x2, y2)
    meta = json.loads((root / "synthetic.json").read_text())
    assert meta["counts"]["edge_boxes"] == 9


def test_grayscale_jpegs_are_single_channel(small: Path) -> None:
    files = sorted((small / "stanford_cars").glob("cars_*/*.jpg")) + sorted((small / "TRUCKS").glob("*.jpg"))
    modes = [Image.open(f).mode for f in files]
    meta = json.loads((small / "stanford_cars" / "synthetic.json").read_text())
    assert set(modes) == {"RGB", "L"}
    assert modes.count("L") == meta["counts"]["grayscale"] > 0


def test_no_grayscale_when_fraction_is_zero(tmp_path: Path) -> None:
    generate_synthetic(tmp_path, **TINY)
    assert {Image.open(f).mode for f in tmp_path.rglob("*.jpg")} == {"RGB"}


def test_extra_class_folder(small: Path, tmp_path: Path) -> None:
    files = sorted((small / "TRUCKS").glob("*.jpg"))
    assert {p.name for p in (small / "TRUCKS").iterdir()} == {"boxes.csv", *(f.name for f in files)}
    assert [f.name for f in files] == [f"{i:05d}.jpg" for i in range(1, 6)]
    assert all(Image.open(f).size == (64, 48) for f in files)
    boxes = pd.read_csv(small / "TRUCKS" / "boxes.csv")  # 1-based inclusive, like the cars' annotations
    assert list(boxes["fname"]) == [f.name for f in files]
    assert ((boxes.x1 >= 1) & (boxes.x1 <= boxes.x2) & (boxes.x2 <= 64)).all()
    assert ((boxes.y1 >= 1) & (boxes.y1 <= boxes.y2) & (boxes.y2 <= 48)).all()
    generate_synthetic(tmp_path, **{**TINY, "extra_class_images": 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stanford_cars"]


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    generate_synthetic(tmp_path / "a", **TINY)
    generate_synthetic(tmp_path / "b", **TINY)
    generate_synthetic(tmp_path / "c", **{**TINY, "seed": 1})
    a, b, c = (files_bytes(tmp_path / k) for k in "abc")
    assert a == b
    assert a.keys() == c.keys()
    differing = [k for k in a if a[k] != c[k]]
    assert all(k in differing for k in a if k.endswith(".jpg"))
    assert class_names(3, seed=0) != class_names(3, seed=1)


def test_images_do_not_depend_on_the_number_of_images(tmp_path: Path) -> None:
    # Seeded per image: more images per class adds images, it does not redraw the others.
    root_a = generate_synthetic(tmp_path / "a", **{**TINY, "images_per_class": 3})
    root_b = generate_synthetic(tmp_path / "b", **{**TINY, "images_per_class": 5})
    imgs_a = {p.read_bytes() for p in root_a.glob("cars_*/*.jpg")}
    imgs_b = {p.read_bytes() for p in root_b.glob("cars_*/*.jpg")}
    assert len(imgs_a) == 9 and imgs_a <= imgs_b


def test_class_names_style_and_close_pairs() -> None:
    names = class_names(20, seed=0)
    assert len(set(names)) == 20
    assert all(re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+ [A-Za-z ]+ (19|20)\d\d", n) for n in names), names
    by_model: dict[str, list[str]] = {}
    for n in names:
        by_model.setdefault(" ".join(n.split()[:2]), []).append(n)
    pairs = [v for v in by_model.values() if len(v) > 1]
    assert pairs, "some classes should share make and model"
    for pair in pairs:
        a, b = (n.split() for n in pair[:2])
        assert (a[-1] != b[-1]) != (a[2:-1] != b[2:-1])  # a year pair or a body pair, not both
    assert len(set(class_names(200, seed=5))) == 200


def test_classes_are_separable_by_a_nearest_mean_classifier(tmp_path: Path) -> None:
    """Fine-grained but learnable: a flip-invariant edge template per class beats chance (1/8) by far."""
    root = generate_synthetic(tmp_path, num_classes=8, images_per_class=16, frame_size=(96, 72), seed=0,
                              extra_class_images=0)

    def features(split: str, rel: str) -> tuple[np.ndarray, np.ndarray]:
        feats, labels = [], []
        for row in annotations(root, rel):
            img = Image.open(root / f"cars_{split}" / str(row["fname"])).convert("L")
            box = (int(row["bbox_x1"]) - 1, int(row["bbox_y1"]) - 1, int(row["bbox_x2"]), int(row["bbox_y2"]))
            x = np.asarray(img.crop(box).resize((32, 32)), np.float32) / 255
            g = np.abs(np.diff(x, axis=1))[:-1] + np.abs(np.diff(x, axis=0))[:, :-1]
            g = (g + g[:, ::-1]).ravel()  # the car faces either way
            feats.append((g - g.mean()) / (g.std() + 1e-6))
            labels.append(int(row["class"]) - 1)
        return np.array(feats), np.array(labels)

    xtr, ytr = features("train", "devkit/cars_train_annos.mat")
    xte, yte = features("test", "cars_test_annos_withlabels.mat")
    means = np.stack([xtr[ytr == c].mean(0) for c in range(8)])
    pred = ((xte[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yte).mean() > 0.4


def test_ensure_reuses_a_complete_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = ensure_synthetic(tmp_path, **TINY)
    assert root.name == "stanford_cars" and (root / "synthetic.json").is_file()
    assert (root.parent / "BIG_TRUCKS").is_dir()

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated a complete dataset")

    monkeypatch.setattr(synthetic, "generate_synthetic", fail)
    assert ensure_synthetic(tmp_path, **TINY) == root
    # The same parameters spelled differently (defaults, list frame) hit the same cache entry.
    assert ensure_synthetic(tmp_path, **{**TINY, "frame_size": [48, 32], "seed": 0}) == root
    monkeypatch.undo()
    other = ensure_synthetic(tmp_path, **{**TINY, "seed": 1})
    assert other != root and other.parent.parent == tmp_path
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_ensure_regenerates_an_incomplete_dataset(tmp_path: Path) -> None:
    root = ensure_synthetic(tmp_path, **TINY)
    reference = files_bytes(root.parent)
    (root / "synthetic.json").unlink()
    (root / "cars_train" / "00001.jpg").unlink()
    (root / "stray.txt").write_text("left by an interrupted run")
    again = ensure_synthetic(tmp_path, **TINY)
    assert again == root
    assert files_bytes(root.parent) == reference


def test_refuses_to_overwrite_an_existing_dataset(small: Path) -> None:
    with pytest.raises(ConfigError, match="already exists"):
        generate_synthetic(small, **SMALL)


@pytest.mark.parametrize(("param", "value"), [
    ("num_classes", 1), ("images_per_class", 1), ("test_fraction", 0.0), ("test_fraction", 1.0),
    ("frame_size", (32, 32)), ("frame_size", (160,)), ("grayscale_fraction", 1.5), ("seed", -1),
    ("extra_class_images", -2), ("extra_class_name", "stanford_cars"), ("extra_class_name", "a/b"),
])
def test_bad_params_raise_config_error(tmp_path: Path, param: str, value: object) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{param}={value!r}")):
        generate_synthetic(tmp_path, **{**TINY, param: value})
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match=param):
        ensure_synthetic(tmp_path, **{**TINY, param: value})


def test_unknown_param_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="colour"):
        ensure_synthetic(tmp_path, colour="red")
