"""Readers against the real Stanford Cars annotation files and sample images, plus small trees built here."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
from PIL import Image

from carsml.data.readers import detect_layout, load_dataset
from carsml.data.readers_devkit import read_devkit
from carsml.data.readers_folders import read_class_folders
from carsml.data.readers_kaggle import read_kaggle_folders
from carsml.data.table import Dataset
from carsml.errors import DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stanford_cars"
DEVKIT = SHARED / "devkit"
KAGGLE = SHARED / "kaggle"
SAMPLE_DIR = SHARED / "sample" / "cars_train_bbox_cropped"
COMPARED = ["fname", "label", "class_name", "x1", "y1", "x2", "y2", "split"]


@pytest.fixture(scope="module")
def real() -> Dataset:
    return load_dataset(SHARED)


@pytest.fixture(scope="module")
def sample_index() -> pd.DataFrame:
    return pd.read_csv(SHARED / "sample" / "sample_index.csv")


# ------------------------------------------------------------------------------------------------------------
# The real annotation files


def test_shared_folder_is_annotations_only(real: Dataset) -> None:
    assert detect_layout(SHARED) == ("annotations_only", SHARED.resolve())
    assert real.layout == "annotations_only" and not real.has_images
    assert (real.table["path"] == "").all()


def test_real_devkit_counts_and_class_statistics(real: Dataset) -> None:
    train, test = real.split("train"), real.split("test")
    assert (len(train), len(test), real.num_classes) == (8144, 8041, 196)
    assert real.class_names[0] == "AM General Hummer SUV 2000"
    assert real.class_names[173] == "Ram C/V Cargo Van Minivan 2012"
    for part, mean in ((train, 41.55), (test, 41.03)):
        counts = part["label"].value_counts()
        assert len(counts) == 196
        assert (round(counts.mean(), 2), counts.min(), counts.max()) == (mean, 24, 68)
    assert set(real.table["label"]) == set(range(196))


def test_real_boxes_become_zero_based_exclusive(real: Dataset) -> None:
    train = real.split("train").set_index("fname")
    # devkit row 0: bbox (39, 116, 569, 375) 1-based inclusive, class 14
    assert tuple(train.loc["00001.jpg", ["x1", "y1", "x2", "y2", "label"]]) == (38, 115, 569, 375, 13)
    assert train.loc["00001.jpg", "class_name"] == "Audi TTS Coupe 2012"
    # values stored as uint16 survive (no uint8 wrap-around), and nothing went negative
    table = real.table
    assert real.split("train")["x2"].max() == 5205
    assert (table[["x1", "y1"]].min() == 0).all()
    assert ((table["x2"] > table["x1"]) & (table["y2"] > table["y1"])).all()


def test_train_labels_match_devkit_perfect_predictions(real: Dataset) -> None:
    preds = np.loadtxt(DEVKIT / "train_perfect_preds.txt", dtype=np.int64)
    assert np.array_equal(real.split("train")["label"].to_numpy(), preds - 1)


def _kaggle_root(tmp_path: Path) -> Path:
    root = tmp_path / "kaggle"
    shutil.copytree(KAGGLE, root)
    return root


def test_kaggle_csvs_agree_row_by_row_with_devkit(real: Dataset, tmp_path: Path) -> None:
    kaggle = load_dataset(_kaggle_root(tmp_path))
    assert kaggle.layout == "annotations_only"
    assert kaggle.class_names == real.class_names
    pd.testing.assert_frame_equal(kaggle.table[COMPARED], real.table[COMPARED])


def test_kaggle_csv_with_header_and_crlf(real: Dataset, tmp_path: Path) -> None:
    root = _kaggle_root(tmp_path)
    for name, header in (("anno_train.csv", "image_name,x_min,y_min,x_max,y_max,label"),
                         ("anno_test.csv", "image,value1,value2,value3,value4,label")):
        lines = (KAGGLE / name).read_text().splitlines()
        (root / name).write_bytes(("\r\n".join([header, *lines]) + "\r\n").encode())
    names = (KAGGLE / "names.csv").read_text().splitlines()
    (root / "names.csv").write_bytes(("\r\n".join(names) + "\r\n").encode())
    kaggle = load_dataset(root)
    assert kaggle.class_names == real.class_names
    pd.testing.assert_frame_equal(kaggle.table[COMPARED], real.table[COMPARED])


def _real_subset(source: Path, target: Path, rows: list[int]) -> None:
    """Some rows of a real devkit .mat file, values untouched (their own uint8/uint16 matrices)."""
    annotations = scipy.io.loadmat(source)["annotations"]
    scipy.io.savemat(target, {"annotations": annotations[:, rows]})


def test_devkit_torchvision_root_with_nested_kaggle_folders(real: Dataset, tmp_path: Path) -> None:
    """torchvision's root (data in stanford_cars/), test labels next to devkit/, images in the nested
    cars_train/cars_train/ of the Kaggle copy, on a subset of the real annotation rows (creating 16k files
    is slow on some file systems). Image files only need to exist for reading the table."""
    data = tmp_path / "stanford_cars"
    (data / "devkit").mkdir(parents=True)
    shutil.copy(DEVKIT / "cars_meta.mat", data / "devkit")
    # The largest class id (196) must occur: the names file has to match the ids the annotations use.
    last = {s: int(np.flatnonzero(real.split(s)["label"] == 195)[0]) for s in ("train", "test")}
    picked = {"train": [0, 1, 2, 7388, last["train"], 8143], "test": [0, last["test"], 8040]}
    _real_subset(DEVKIT / "cars_train_annos.mat", data / "devkit" / "cars_train_annos.mat", picked["train"])
    _real_subset(DEVKIT / "cars_test_annos_withlabels.mat", data / "cars_test_annos_withlabels.mat",
                 picked["test"])
    expected = pd.concat([real.split(s).iloc[rows] for s, rows in picked.items()], ignore_index=True)
    for folder, split in ((data / "cars_train" / "cars_train", "train"), (data / "cars_test", "test")):
        folder.mkdir(parents=True)
        for name in expected.loc[expected["split"] == split, "fname"]:
            (folder / name).touch()

    assert detect_layout(tmp_path) == ("devkit", data.resolve())
    ds = load_dataset(tmp_path)
    assert ds.layout == "devkit" and ds.has_images and ds.notes == []
    pd.testing.assert_frame_equal(ds.table[COMPARED], expected[COMPARED])
    first_test = ds.split("test")["path"].iloc[0]
    assert first_test == str(data.resolve() / "cars_test" / "00001.jpg") and os.path.isfile(first_test)
    assert ds.split("train")["path"].iloc[-1].endswith(os.path.join("cars_train", "cars_train", "08144.jpg"))


# ------------------------------------------------------------------------------------------------------------
# Small devkit trees written with scipy.io.savemat


def _annotations(rows: list[tuple], with_class: bool = True) -> np.ndarray:
    """A MATLAB struct array like the devkit's: each value its own matrix, uint8 below 256, uint16 above."""
    def num(v: int) -> np.ndarray:
        return np.array([[v]], dtype=np.uint8 if v < 256 else np.uint16)

    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
    out = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        *numbers, fname = row
        out[0, i] = (*(num(v) for v in numbers), np.array([fname]))
    return out


def _devkit(root: Path, train: list[tuple], test: list[tuple] | None,
            names: tuple[str, ...] = ("A", "B/C", "D"), test_unlabelled: bool = False,
            images: bool = True) -> Path:
    (root / "devkit").mkdir(parents=True)
    class_names = np.empty((1, len(names)), dtype=object)
    class_names[0, :] = [np.array([n]) for n in names]
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": class_names})
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _annotations(train)})
    if test is not None:
        name = "cars_test_annos.mat" if test_unlabelled else "cars_test_annos_withlabels.mat"
        target = root / "devkit" / name
        rows = [r[:4] + r[5:] for r in test] if test_unlabelled else test
        scipy.io.savemat(target, {"annotations": _annotations(rows, with_class=not test_unlabelled)})
    if images:
        for split, rows in (("train", train), ("test", test or [])):
            (root / f"cars_{split}").mkdir()
            for row in rows:
                Image.new("RGB", (8, 8)).save(root / f"cars_{split}" / row[-1])
    return root


TRAIN = [(1, 1, 300, 200, 1, "00001.jpg"), (5, 6, 10, 12, 2, "00002.jpg"), (250, 2, 260, 270, 3, "00003.jpg")]
TEST = [(1, 2, 3, 4, 3, "00001.jpg"), (7, 7, 9, 9, 1, "00002.jpg")]


def test_small_devkit_mixed_uint8_uint16_and_test_labels_inside_devkit(tmp_path: Path) -> None:
    ds = read_devkit(_devkit(tmp_path / "d", TRAIN, TEST))
    assert ds.class_names == ["A", "B/C", "D"]
    train = ds.split("train")
    assert train[["x1", "y1", "x2", "y2", "label"]].values.tolist() == [
        [0, 0, 300, 200, 0], [4, 5, 10, 12, 1], [249, 1, 260, 270, 2]]
    assert ds.split("test")["label"].tolist() == [2, 0]
    assert list(train["class_name"]) == ["A", "B/C", "D"]


def test_devkit_without_test_labels_omits_test_with_note(tmp_path: Path) -> None:
    root = _devkit(tmp_path / "d", TRAIN, TEST, test_unlabelled=True)
    ds = load_dataset(root)
    assert ds.layout == "devkit"
    assert set(ds.table["split"]) == {"train"} and len(ds.table) == 3
    assert any("cars_test_annos_withlabels.mat" in n and "omitted" in n for n in ds.notes)


def test_devkit_missing_images_lists_count_and_first_paths(tmp_path: Path) -> None:
    root = _devkit(tmp_path / "d", TRAIN, TEST)
    (root / "cars_train" / "00002.jpg").unlink()
    (root / "cars_train" / "00003.jpg").unlink()
    pattern = r"2 of the 3 train images listed in .*cars_train_annos.mat are missing"
    with pytest.raises(DataError, match=pattern) as e:
        load_dataset(root)
    assert "00002.jpg" in str(e.value) and "00003.jpg" in str(e.value) and "00001.jpg" not in str(e.value)


def test_devkit_without_image_folders_is_annotations_only(tmp_path: Path) -> None:
    root = _devkit(tmp_path / "d", TRAIN, TEST, images=False)
    ds = load_dataset(root)
    assert ds.layout == "annotations_only" and not ds.has_images and len(ds.table) == 5


def test_mat_without_expected_fields(tmp_path: Path) -> None:
    root = _devkit(tmp_path / "d", TRAIN, TEST)
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat",
                     {"annotations": _annotations([r[:4] + r[5:] for r in TRAIN], with_class=False)})
    with pytest.raises(DataError, match=r"cars_train_annos.mat: 'annotations' has fields \[.*'fname'\]; "
                                        r"expected \[.*'class', 'fname'\] \(missing \['class'\]\)"):
        load_dataset(root)


def test_mat_without_expected_variable_or_not_a_mat(tmp_path: Path) -> None:
    root = _devkit(tmp_path / "d", TRAIN, TEST)
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"names": np.array(["A"], dtype=object)})
    with pytest.raises(DataError, match=r"cars_meta.mat: no variable 'class_names' "
                                        r"\(variables found: \['names'\]"):
        load_dataset(root)
    (root / "devkit" / "cars_meta.mat").write_text("this is not a mat file")
    with pytest.raises(DataError, match="cars_meta.mat: cannot be read as a MATLAB .mat file"):
        load_dataset(root)


def test_mat_non_integer_value_names_row_and_field(tmp_path: Path) -> None:
    root = _devkit(tmp_path / "d", TRAIN, TEST)
    annotations = _annotations(TRAIN)
    annotations[0, 1]["bbox_y2"] = np.array([[12.5]])
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": annotations})
    with pytest.raises(DataError, match=r"cars_train_annos.mat: row 2 \(00002.jpg\): field 'bbox_y2' is "
                                        r".*12.5.*; expected an integer"):
        load_dataset(root)


def test_class_id_out_of_range(tmp_path: Path) -> None:
    bad = [*TRAIN[:2], (3, 3, 9, 9, 0, "00003.jpg")]
    with pytest.raises(DataError, match=r"cars_train_annos.mat, row 3 \(00003.jpg\): class 0 is out of "
                                        r"range; expected 1..3"):
        load_dataset(_devkit(tmp_path / "low", bad, TEST))
    bad = [*TRAIN[:2], (3, 3, 9, 9, 9, "00003.jpg")]  # ids 1, 2, 9: a stray id, not a short names file
    with pytest.raises(DataError, match=r"row 3 \(00003.jpg\): class 9 is out of range; expected 1..3"):
        load_dataset(_devkit(tmp_path / "high", bad, TEST))


def test_meta_with_too_few_names(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cars_meta.mat lists 2 class names but .* use class ids 1..3"):
        load_dataset(_devkit(tmp_path / "d", TRAIN, TEST, names=("A", "B")))


def test_empty_box_is_reported(tmp_path: Path) -> None:
    bad = [*TRAIN[:2], (30, 3, 20, 9, 3, "00003.jpg")]
    with pytest.raises(DataError, match=r"row 3 \(00003.jpg\): box .* is empty"):
        load_dataset(_devkit(tmp_path / "d", bad, TEST))


# ------------------------------------------------------------------------------------------------------------
# Kaggle CSV problems


def test_names_csv_with_wrong_number_of_classes(tmp_path: Path) -> None:
    root = _kaggle_root(tmp_path)
    names = (KAGGLE / "names.csv").read_text().splitlines()
    (root / "names.csv").write_text("\n".join(names[:-1]) + "\n")
    with pytest.raises(DataError, match=r"names.csv lists 195 class names but anno_train.csv and "
                                        r"anno_test.csv use class ids 1..196"):
        load_dataset(root)
    (root / "names.csv").write_text("\n".join(["name", *names]) + "\n")  # a header row shifts every name
    with pytest.raises(DataError, match=r"names.csv lists 197 class names .* ids 1..196"):
        load_dataset(root)


def test_anno_csv_bad_value_names_line(tmp_path: Path) -> None:
    root = _kaggle_root(tmp_path)
    lines = (KAGGLE / "anno_train.csv").read_text().splitlines()
    lines[2] = "00003.jpg,85,abc,601,381,91"
    (root / "anno_train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"anno_train.csv, line 3 \(00003.jpg\): y1 is 'abc'; expected "
                                        r"an integer"):
        load_dataset(root)
    lines[2] = "00003.jpg,85,109,601"
    (root / "anno_train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"anno_train.csv, line 3: 4 fields"):
        load_dataset(root)


def test_anno_csv_class_out_of_range(tmp_path: Path) -> None:
    root = _kaggle_root(tmp_path)
    lines = (KAGGLE / "anno_test.csv").read_text().splitlines()
    lines[4] = lines[4].rsplit(",", 1)[0] + ",0"
    (root / "anno_test.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"anno_test.csv, line 5 \(00005.jpg\): class 0 is out of range; "
                                        r"expected 1..196"):
        load_dataset(root)


# ------------------------------------------------------------------------------------------------------------
# The real sample JPEGs arranged as class folders and as Kaggle folders


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        dst.symlink_to(src)
    except OSError:  # file systems without symlinks
        shutil.copy(src, dst)


def _arrange_samples(base: Path, sample_index: pd.DataFrame) -> None:
    for row in sample_index.itertuples():
        _link(SAMPLE_DIR / row.fname, base / "train" / row.class_name.replace("/", "-") / row.fname)


def test_samples_as_class_folders(tmp_path: Path, sample_index: pd.DataFrame) -> None:
    _arrange_samples(tmp_path, sample_index)
    ds = load_dataset(tmp_path)
    assert ds.layout == "class_folders"
    assert ds.num_classes == sample_index["class_name"].nunique() == 196
    assert len(ds.table) == len(sample_index) and set(ds.table["split"]) == {"train"}
    assert ds.class_names == sorted(ds.class_names) and "Ram C-V Cargo Van Minivan 2012" in ds.class_names
    # box = the whole image, from the header
    merged = ds.table.merge(sample_index, on="fname")
    assert (merged["x1"] == 0).all() and (merged["y1"] == 0).all()
    assert (merged["x2"] == merged["crop_width"]).all() and (merged["y2"] == merged["crop_height"]).all()
    assert (merged["class_name_x"] == merged["class_name_y"].str.replace("/", "-")).all()


def test_samples_as_kaggle_folders_follow_names_csv(tmp_path: Path, sample_index: pd.DataFrame) -> None:
    base = tmp_path / "car_data" / "car_data"
    _arrange_samples(base, sample_index)
    shutil.copy(KAGGLE / "names.csv", tmp_path)
    wanted = set(sample_index["fname"])
    lines = [ln for ln in (KAGGLE / "anno_train.csv").read_text().splitlines() if ln.split(",")[0] in wanted]
    (tmp_path / "anno_train.csv").write_text("\n".join(lines) + "\n")

    ds = load_dataset(tmp_path)
    assert ds.layout == "kaggle_folders" and set(ds.table["split"]) == {"train"}
    merged = ds.table.merge(sample_index, on="fname")
    assert len(merged) == len(sample_index)
    assert (merged["label"] == merged["class_id_1based"] - 1).all()
    assert (merged["class_name_x"] == merged["class_name_y"]).all()
    assert (merged["x1"] == merged["orig_bbox_x1"] - 1).all()
    assert (merged["x2"] == merged["orig_bbox_x2"]).all()
    assert all(os.path.isfile(p) for p in ds.table["path"])

    # Sorted folder order (what ImageFolder would use) gives other ids for most classes.
    folder_order = sorted(n.replace("/", "-") for n in ds.class_names)
    differing = [i for i, n in enumerate(ds.class_names) if folder_order.index(n.replace("/", "-")) != i]
    assert len(differing) == 143
    moved = ds.class_names[differing[0]]  # "Acura RL Sedan 2012": id 2, but 3rd in folder order
    rows = ds.table[ds.table["class_name"] == moved]
    assert len(rows) and (rows["label"] == differing[0]).all()
    assert (rows["label"] != folder_order.index(moved)).all()
    ram_rows = ds.table[ds.table["class_name"] == "Ram C/V Cargo Van Minivan 2012"]
    assert len(ram_rows) and (ram_rows["label"] == 173).all()
    assert (ram_rows["path"].str.contains("Ram C-V Cargo Van Minivan 2012")).all()

    # Pointed at car_data/car_data/ itself, the CSVs two levels up still decide the labels.
    for inner in (base, base.parent):
        assert detect_layout(inner) == ("kaggle_folders", tmp_path.resolve())
    pd.testing.assert_frame_equal(load_dataset(base).table, ds.table)


def test_kaggle_folders_missing_image_and_split_folder(tmp_path: Path, sample_index: pd.DataFrame) -> None:
    base = tmp_path / "car_data"
    _arrange_samples(base, sample_index.iloc[1:])  # the first sample is not on disk
    shutil.copy(KAGGLE / "names.csv", tmp_path)
    wanted = set(sample_index["fname"])
    lines = [ln for ln in (KAGGLE / "anno_train.csv").read_text().splitlines() if ln.split(",")[0] in wanted]
    (tmp_path / "anno_train.csv").write_text("\n".join(lines) + "\n")
    first = sample_index.iloc[0]
    with pytest.raises(DataError, match=rf"1 of the 236 train images listed in .*anno_train.csv are "
                                        rf"missing(.|\n)*{first.class_name}/{first.fname}"):
        read_kaggle_folders(tmp_path)
    _link(SAMPLE_DIR / first.fname, base / "train" / first.class_name / first.fname)
    assert len(load_dataset(tmp_path).table) == 236
    shutil.copy(KAGGLE / "anno_test.csv", tmp_path)
    with pytest.raises(DataError, match=r"anno_test.csv lists 8041 test images but there is no folder "
                                        r".*test/"):
        load_dataset(tmp_path)


# ------------------------------------------------------------------------------------------------------------
# Class folders built here


def _image(path: Path, size: tuple[int, int] = (12, 8), exif_orientation: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    Image.new("RGB", size, (9, 9, 9)).save(path, **kwargs)


def test_class_folders_with_splits_sorted_classes_and_exif_sizes(tmp_path: Path) -> None:
    _image(tmp_path / "train" / "zebra" / "a.jpg", (30, 10), exif_orientation=6)
    _image(tmp_path / "train" / "apple" / "b.png", (16, 9))
    _image(tmp_path / "test" / "zebra" / "c.JPEG")
    (tmp_path / "train" / "apple" / "readme.txt").write_text("not an image")
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / ".hidden").mkdir()
    _image(tmp_path / "train" / ".hidden" / "x.jpg")
    ds = load_dataset(tmp_path)
    assert ds.layout == "class_folders" and ds.class_names == ["apple", "zebra"]
    rows = ds.table.set_index("fname")
    # stored 30x10 with EXIF orientation 6: displayed (and boxed) as 10x30
    assert tuple(rows.loc["a.jpg", ["label", "x2", "y2", "split"]]) == (1, 10, 30, "train")
    assert tuple(rows.loc["b.png", ["label", "x2", "y2"]]) == (0, 16, 9)
    assert rows.loc["c.JPEG", "split"] == "test" and len(rows) == 3
    assert any("empty" in n and "no images" in n for n in ds.notes)


def test_single_folder_of_class_folders_is_all_train(tmp_path: Path, monkeypatch) -> None:
    for cls in ("b", "a", "c"):
        _image(tmp_path / "data" / cls / f"{cls}1.jpg")
    monkeypatch.chdir(tmp_path)
    ds = read_class_folders(Path("data"))  # a relative root still gives absolute paths
    assert ds.class_names == ["a", "b", "c"] and set(ds.table["split"]) == {"train"}
    assert ds.table["path"].tolist() == [str(tmp_path.resolve() / "data" / c / f"{c}1.jpg") for c in "abc"]
    assert detect_layout("data") == ("class_folders", (tmp_path / "data").resolve())


@pytest.mark.parametrize("base", [("car_data",), ()])
def test_kaggle_split_folder_variants_detected(tmp_path: Path, base: tuple[str, ...]) -> None:
    _image(tmp_path.joinpath(*base, "test", "x", "1.jpg"))
    assert detect_layout(tmp_path) == ("class_folders", tmp_path.resolve())


def test_corrupt_header_in_class_folder_names_file(tmp_path: Path) -> None:
    _image(tmp_path / "train" / "a" / "good.jpg")
    (tmp_path / "train" / "a" / "bad.jpg").write_text("garbage")
    with pytest.raises(DataError, match="bad.jpg: not a recognised image"):
        load_dataset(tmp_path)


# ------------------------------------------------------------------------------------------------------------
# Paths that are not datasets


def test_unknown_data_value_and_nonexistent_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"Data path 'synthtic' does not exist.*valid values for data: "
                                        r"'synthetic'"):
        load_dataset("synthtic")
    with pytest.raises(DataError, match="is empty"):
        load_dataset("")


def test_file_and_empty_folder(tmp_path: Path) -> None:
    f = tmp_path / "names.csv"
    f.write_text("A\n")
    with pytest.raises(DataError, match="is a file; expected a folder"):
        load_dataset(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_dataset(tmp_path / "empty")


def test_pointing_inside_a_devkit_says_to_use_the_parent(tmp_path: Path) -> None:
    root = _devkit(tmp_path / "d", TRAIN, TEST)
    with pytest.raises(DataError, match="devkit/ is a folder inside a dataset"):
        load_dataset(root / "devkit")


def test_nothing_matches_lists_every_layout_and_where(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "devkit").mkdir()
    shutil.copy(DEVKIT / "cars_meta.mat", tmp_path / "devkit")  # names alone are not annotations
    _image(tmp_path / "cars_train" / "00001.jpg")  # devkit image folder: not a class folder
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path)
    message = str(e.value)
    for expected in ("devkit:", "kaggle_folders:", "class_folders:", "annotations_only:",
                     str(tmp_path.resolve()), "found: cars_train/, devkit/cars_meta.mat", "notes.txt"):
        assert expected in message
