"""A synthetic, fine-grained "Stanford Cars" written in the exact devkit layout.

The embedded default dataset of carsml is generated here, so that every path a real user takes (devkit .mat
files with their uint8/uint16 quirk, 1-based boxes, grayscale JPEGs, boxes touching the frame edge,
torchvision's `StanfordCars` layout) is exercised without the 1.9 GB original.

Fine-grained by design: classes share a few body types and, within one, differ only in details (wheel size
and rim style, head/tail light shape, grille, trim, roof line, proportions). Some classes share make and model
and differ only in year (two changed details) or in body type (same details). Everything else varies per
image and carries no class information: body colour, background clutter, position and scale of the car,
facing direction, lighting, noise.

Every random draw comes from a numpy Generator seeded by (seed, stream, indices), so an image does not depend
on the order or number of the others and the same seed gives byte-identical files.

This module holds the parameters, the random streams and JPEG encoding of each image, the devkit files, and the
cache (`ensure_synthetic`). The class designs are in `carsml.data.synthetic_designs`, the drawing of cars and
trucks in `carsml.data.synthetic_drawing`, and the composition of a photo around a drawing in
`carsml.data.synthetic_scenes`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io as sio
from PIL import Image

from carsml.data.synthetic_designs import _CarClass, _class_designs, _options
from carsml.data.synthetic_drawing import _car_height, _draw_car, _draw_truck, _truck_shape
from carsml.data.synthetic_scenes import _random_colour, _render
from carsml.errors import ConfigError

GENERATOR_VERSION = 2  # 2: the extra class's folder has boxes.csv
MARKER = "synthetic.json"
DATASET_DIR = "stanford_cars"
MIN_FRAME = (48, 32)
JPEG_QUALITY = 90
EDGE_FRACTION = 0.04  # share of images whose car is cut by the frame edge (the box touches the edge)

DEFAULTS: dict[str, Any] = {
    "num_classes": 20,
    "images_per_class": 60,
    "test_fraction": 0.5,
    "frame_size": (160, 120),
    "seed": 0,
    "extra_class_images": 100,
    "extra_class_name": "BIG_TRUCKS",
    "grayscale_fraction": 0.03,
}

# Random-stream ids: each kind of draw has its own stream so that adding one kind never shifts another.
_S_DESIGN, _S_IMAGE, _S_EXTRA, _S_SPLIT, _S_ORDER = range(5)

# A fixed MAT header: scipy writes the current time there, which would break byte-identical output.
_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created by: carsml synthetic generator"


# ----------------------------------------------------------------------------------------------- images


def _encode(img: Image.Image, rng: np.random.Generator, grayscale_fraction: float) -> tuple[bytes, bool]:
    """JPEG bytes; a few images are single-channel "L" JPEGs, like some of the real ones."""
    gray = bool(rng.random() < grayscale_fraction)
    buf = io.BytesIO()
    (img.convert("L") if gray else img).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), gray


@dataclass
class _Shot:
    jpeg: bytes
    box: tuple[int, int, int, int]  # 1-based inclusive, as in the devkit
    gray: bool
    edge: bool


def _car_image(cls: _CarClass, label: int, index: int, p: dict[str, Any]) -> _Shot:
    rng = np.random.default_rng([p["seed"], _S_IMAGE, label, index])
    gray_rng = np.random.default_rng([p["seed"], _S_IMAGE, label, index, 1])
    colour = _random_colour(rng)
    design = _options(rng, cls.design)
    w, h = p["frame_size"]
    img, (x1, y1, x2, y2) = _render(rng, w, h, _car_height(design),
                                    lambda c: _draw_car(c, design, colour), edge_fraction=EDGE_FRACTION)
    jpeg, gray = _encode(img, gray_rng, p["grayscale_fraction"])
    edge = x1 == 0 or y1 == 0 or x2 == w or y2 == h
    return _Shot(jpeg, (x1 + 1, y1 + 1, x2, y2), gray, edge)


def _truck_image(index: int, p: dict[str, Any]) -> tuple[bytes, bool, tuple[int, int, int, int]]:
    rng = np.random.default_rng([p["seed"], _S_EXTRA, index])
    gray_rng = np.random.default_rng([p["seed"], _S_EXTRA, index, 1])
    colour = _random_colour(rng)
    shape = _truck_shape(rng)
    w, h = p["frame_size"]
    img, (x1, y1, x2, y2) = _render(rng, w, h, shape.height, lambda c: _draw_truck(c, shape, colour),
                                    edge_fraction=None)
    return *_encode(img, gray_rng, p["grayscale_fraction"]), (x1 + 1, y1 + 1, x2, y2)


# ------------------------------------------------------------------------------------------------ files


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_mat(path: Path, variables: dict[str, np.ndarray]) -> None:
    """A MATLAB v5 file like the devkit's, with a fixed header (scipy writes the current time there)."""
    buf = io.BytesIO()
    sio.savemat(buf, variables, format="5")
    data = bytearray(buf.getvalue())
    data[:116] = _MAT_HEADER.ljust(116, b" ")
    _atomic_write(path, bytes(data))


def _mat_int(v: int) -> np.ndarray:
    # The real devkit stores each integer as a 1x1 uint8, or uint16 when it does not fit: mirror that quirk.
    return np.array([[v]], dtype=np.uint8 if v < 256 else np.uint16)


def _annotations(rows: list[tuple[tuple[int, int, int, int], int, str]], with_class: bool) -> np.ndarray:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", *(["class"] if with_class else []), "fname"]
    arr = np.empty((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, (box, class_id, fname) in enumerate(rows):
        ints = [*box, *([class_id] if with_class else [])]
        arr[0, i] = (*[_mat_int(v) for v in ints], np.array([fname]))
    return arr


# ----------------------------------------------------------------------------------------------- params


def _validate(params: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and every value checked; raises ConfigError naming the parameter and value."""
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown synthetic dataset parameter(s) {unknown}; "
                          f"expected some of {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **params}

    def integer(name: str, low: int) -> None:
        v = p[name]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ConfigError(f"synthetic dataset: {name}={v!r} is invalid; expected an integer >= {low}")
        p[name] = int(v)

    integer("num_classes", 2)
    integer("images_per_class", 2)
    integer("seed", 0)
    integer("extra_class_images", 0)
    tf = p["test_fraction"]
    if isinstance(tf, bool) or not isinstance(tf, (int, float)) or not 0.0 < tf < 1.0:
        raise ConfigError(f"synthetic dataset: test_fraction={tf!r} is invalid; expected a number in (0, 1)")
    gf = p["grayscale_fraction"]
    if isinstance(gf, bool) or not isinstance(gf, (int, float)) or not 0.0 <= gf <= 1.0:
        raise ConfigError(f"synthetic dataset: grayscale_fraction={gf!r} is invalid; "
                          f"expected a number in [0, 1]")
    p["test_fraction"], p["grayscale_fraction"] = float(tf), float(gf)
    fs = p["frame_size"]
    ok = (isinstance(fs, (tuple, list)) and len(fs) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in fs))
    if not ok or fs[0] < MIN_FRAME[0] or fs[1] < MIN_FRAME[1]:
        raise ConfigError(f"synthetic dataset: frame_size={fs!r} is invalid; "
                          f"expected (width, height) integers of at least {MIN_FRAME}")
    p["frame_size"] = (int(fs[0]), int(fs[1]))
    name = p["extra_class_name"]
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\\" in name \
            or name == DATASET_DIR:
        raise ConfigError(f"synthetic dataset: extra_class_name={name!r} is invalid; "
                          f"expected a plain folder name other than {DATASET_DIR!r}")
    return p


def _split_counts(n: int, test_fraction: float) -> int:
    """Test images of a class: round(n * fraction), but at least one image in each split."""
    return min(n - 1, max(1, round(n * test_fraction)))


# --------------------------------------------------------------------------------------------- public


def class_names(num_classes: int = DEFAULTS["num_classes"], seed: int = DEFAULTS["seed"]) -> list[str]:
    """The class names a generation with these parameters writes, in class-id order (id = index + 1)."""
    _validate({"num_classes": num_classes, "seed": seed})
    return [c.name for c in _class_designs(np.random.default_rng([seed, _S_DESIGN]), num_classes)]


def generate_synthetic(out_dir: Path, *, num_classes: int = 20, images_per_class: int = 60,
                       test_fraction: float = 0.5, frame_size: tuple[int, int] = (160, 120), seed: int = 0,
                       extra_class_images: int = 100, extra_class_name: str = "BIG_TRUCKS",
                       grayscale_fraction: float = 0.03) -> Path:
    """Write a synthetic dataset in Stanford Cars devkit layout under out_dir; return out_dir/'stanford_cars'.

    `torchvision.datasets.StanfordCars(root=out_dir, split=...)` loads it unchanged. Images of one extra class
    (big trucks; their boxes in boxes.csv) go to out_dir/<extra_class_name>/. `stanford_cars/synthetic.json`
    (parameters and counts) is written last, so its presence means the dataset is complete. Refuses (ConfigError) to
    write into an existing non-empty dataset folder rather than mixing two generations.
    """
    p = _validate(dict(num_classes=num_classes, images_per_class=images_per_class,
                       test_fraction=test_fraction, frame_size=frame_size, seed=seed,
                       extra_class_images=extra_class_images,
                       extra_class_name=extra_class_name, grayscale_fraction=grayscale_fraction))
    out_dir = Path(out_dir)
    root = out_dir / DATASET_DIR
    extra_dir = out_dir / p["extra_class_name"]
    for d in (root, extra_dir):
        if d.exists() and any(d.iterdir()):
            raise ConfigError(f"synthetic dataset: {d} already exists and is not empty; remove it or choose "
                              f"another output folder")
    for d in (root / "devkit", root / "cars_train", root / "cars_test"):
        d.mkdir(parents=True, exist_ok=True)

    classes = _class_designs(np.random.default_rng([p["seed"], _S_DESIGN]), p["num_classes"])
    splits = _assign_splits(p)
    stats = {"grayscale": 0, "edge_boxes": 0}
    annos: dict[str, list] = {}
    for split, items in splits.items():
        annos[split] = []
        for k, (label, index) in enumerate(items):
            fname = f"{k + 1:05d}.jpg"
            shot = _car_image(classes[label], label, index, p)
            _atomic_write(root / f"cars_{split}" / fname, shot.jpeg)
            annos[split].append((shot.box, label + 1, fname))
            stats["grayscale"] += shot.gray
            stats["edge_boxes"] += shot.edge

    names = np.empty((1, len(classes)), dtype=object)
    for i, c in enumerate(classes):
        names[0, i] = c.name
    _write_mat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    _write_mat(root / "devkit" / "cars_train_annos.mat", {"annotations": _annotations(annos["train"], True)})
    _write_mat(root / "devkit" / "cars_test_annos.mat", {"annotations": _annotations(annos["test"], False)})
    # torchvision reads the labelled test annotations one level above devkit/.
    _write_mat(root / "cars_test_annos_withlabels.mat", {"annotations": _annotations(annos["test"], True)})

    if p["extra_class_images"]:
        extra_dir.mkdir(parents=True, exist_ok=True)
        box_lines = ["fname,x1,y1,x2,y2"]  # the trucks' boxes, 1-based inclusive like the cars' annotations
        for i in range(p["extra_class_images"]):
            jpeg, gray, box = _truck_image(i, p)
            _atomic_write(extra_dir / f"{i + 1:05d}.jpg", jpeg)
            box_lines.append(",".join(map(str, (f"{i + 1:05d}.jpg", *box))))
            stats["grayscale"] += gray
        _atomic_write(extra_dir / "boxes.csv", ("\n".join(box_lines) + "\n").encode())

    meta = {
        "generator": "carsml.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "params": {**p, "frame_size": list(p["frame_size"])},
        "counts": {"classes": len(classes), "train": len(annos["train"]), "test": len(annos["test"]),
                   "extra": p["extra_class_images"], **stats},
        "classes": [{"id": i + 1, "name": c.name, "family": c.family, "body": c.design.body,
                     "variant_of": c.variant_of} for i, c in enumerate(classes)],
    }
    _atomic_write(root / MARKER, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    return root


def _assign_splits(p: dict[str, Any]) -> dict[str, list[tuple[int, int]]]:
    """(label, image index) per split; each class's test images drawn at random, files in shuffled order."""
    n = p["images_per_class"]
    n_test = _split_counts(n, p["test_fraction"])
    train: list[tuple[int, int]] = []
    test: list[tuple[int, int]] = []
    for label in range(p["num_classes"]):
        perm = np.random.default_rng([p["seed"], _S_SPLIT, label]).permutation(n)
        test += [(label, int(i)) for i in sorted(perm[:n_test])]
        train += [(label, int(i)) for i in sorted(perm[n_test:])]
    # The real files interleave classes; fname order is a random permutation of the items.
    out = {}
    for k, (split, items) in enumerate((("train", train), ("test", test))):
        order = np.random.default_rng([p["seed"], _S_ORDER, k]).permutation(len(items))
        out[split] = [items[int(i)] for i in order]
    return out


def params_digest(params: dict[str, Any]) -> str:
    """The cache key of a parameter set (defaults filled in; includes the generator version)."""
    p = _validate(params)
    keyed = {**p, "frame_size": list(p["frame_size"]), "_version": GENERATOR_VERSION}
    blob = json.dumps(keyed, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_complete(root: Path, params: dict[str, Any] | None = None) -> bool:
    """True when `root` (a stanford_cars folder) holds a finished generation, of `params` if given."""
    marker = Path(root) / MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("generator_version") != GENERATOR_VERSION:
        return False
    if params is None:
        return True
    p = _validate(params)
    return meta.get("params") == {**p, "frame_size": list(p["frame_size"])}


def ensure_synthetic(cache_dir: Path, **params: Any) -> Path:
    """Return the stanford_cars root of a synthetic dataset for these params, generating it on first use.

    The dataset lives in cache_dir/synthetic-<digest of the params>/ (the extra class beside stanford_cars/).
    It is generated into a temporary folder and renamed into place, and a folder without a valid marker
    (an interrupted or foreign generation) is replaced, so a partial dataset is never returned.
    """
    digest = params_digest(params)
    cache_dir = Path(cache_dir)
    final = cache_dir / f"synthetic-{digest}"
    if is_complete(final / DATASET_DIR, params):
        return final / DATASET_DIR
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-synthetic-{digest}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        generate_synthetic(tmp, **_validate(params))
        if final.exists():  # incomplete leftovers of an interrupted run (checked above)
            if is_complete(final / DATASET_DIR, params):  # another process finished meanwhile
                return final / DATASET_DIR
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            # Lost a race with a concurrent generation of the same params: use theirs if it is complete.
            if not is_complete(final / DATASET_DIR, params):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final / DATASET_DIR
