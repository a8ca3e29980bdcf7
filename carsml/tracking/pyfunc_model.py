"""MLflow pyfunc adapter (models-from-code): images (and optional boxes) in, labels and top-5 out.

Input: a DataFrame with a column `image` holding JPEG or PNG file bytes — MLflow's `binary` type: JSON clients send
base64 text in `dataframe_split`, which the scoring server decodes to bytes; in-process callers may pass bytes or
base64 text — and an optional column `box`: per row null, or [x1, y1, x2, y2] in whole pixels of the image as
displayed, 0-based with x2 and y2 exclusive (the dataset table's convention, docs/data.md). The box is applied with the
model's box policy (`carsml.tracking.models.box_policy`: crop to it grown by `crop_margin` when the model was trained on
box crops, else checked and ignored), exactly as the training cache applies its dataset row's box. Output per row:
`label`, `class_id` (0-based), `score`, and `top5_labels` / `top5_scores` (lists, best first). Bad requests raise
MlflowException(INVALID_PARAMETER_VALUE), which `mlflow models serve` answers with HTTP 400; one bad row refuses the
whole request with a message naming every bad row (never a partial answer).

Limits (docs/serving.md), checked from the cheapest end so an abusive request is refused before anything expensive:
the row count (MAX_ROWS) and the request's total bytes (MAX_REQUEST_BYTES, from the base64 lengths) first; then the
header of every row — size in bytes (MAX_IMAGE_BYTES), format (JPEG or PNG, from the file's signature), pixels per image
(MAX_PIXELS), box — and the total pixels to decode (MAX_REQUEST_PIXELS); only when all of that passes is any image
decoded. Decoding is the training decoder's, the same functions (`carsml.data.images.plan_crop` / `finish_crop`: mode
conversion, EXIF orientation, alpha on white, crop to the box, JPEGs at a reduced DCT scale when the crop is at least
twice the model's input size, antialiased bilinear resize), spread over a small thread pool (PIL releases the GIL while
it decodes). A PNG whose EXIF follows its pixel data has its box checked when it is decoded (PIL finds that EXIF only
by reading the whole file), still before anything is predicted. The network runs through the engine's `predict` in
float32 (SERVE_AMP), the inference path of evaluation.

Threads: the scoring server calls `predict` from a pool of worker threads, and every thread that runs torch gets its
own OpenMP team; teams on the same cores slow each other down, and an OpenMP team waits for its slowest thread at every
layer. So the network only ever runs on this model's own inference threads: usable cores // CARSML_SERVE_THREADS of
them, each with CARSML_SERVE_THREADS torch intra-op threads (default `default_threads()`: every usable core), loaded
there too; a batch is split across them. The rest of the process keeps torch's own thread setting.

Larger than the house's 450 lines because MLflow loads this one file as the model's code: the request contract (limits,
refusals, boxes), decoding and the threaded forward are what a served request runs, read here together.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import numbers
import os
import re
import struct
import threading
import weakref
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image, UnidentifiedImageError

from carsml.data.images import CropPlan, box_region, finish_crop, orientation_needs_decode, plan_crop
from carsml.engine.evaluate import Prediction
from carsml.engine.evaluate import predict as engine_predict
from carsml.errors import DataError
from carsml.tracking.models import BoxPolicy, box_policy

MIB = 1024 * 1024
MAX_ROWS = 64  # images per request: bounds the forward pass (time and activation memory) of one request
MAX_REQUEST_BYTES = 32 * MIB  # all images of a request together, decoded from base64
MAX_IMAGE_BYTES = 20 * MIB  # per image, decoded from base64
MAX_PIXELS = 40_000_000  # per image, width x height as stored
MAX_REQUEST_PIXELS = 100_000_000  # all images of a request together, as decoded (a drafted JPEG at its reduced scale)
PARALLEL_DECODE_MAX_PIXELS = 4_000_000  # larger images are decoded one at a time (memory: ~4-20 bytes per pixel)
MIN_SIDE_FRACTION = 8  # an image (or its box) must be at least 1/8 of the model's input on its shorter side
MAX_ROWS_DESCRIBED = 10  # bad rows whose problem a refusal spells out (all bad row indexes are listed)
FORMATS = "JPEG and PNG"  # what is accepted, as messages and docs name it
SERVE_THREADS_ENV = "CARSML_SERVE_THREADS"
MAX_DECODE_THREADS = 8  # the decoding pool: one thread per usable core, at most this many
SERVE_AMP = "off"  # the served forward pass runs in float32 (`autocast_dtype`), whatever the training run used
SERVE_CHANNELS_LAST = False  # NCHW, as the serving benchmark measured (docs/serving.md, Threads)
BOX_FORMAT = "[x1, y1, x2, y2] in whole pixels, 0-based, x2 and y2 exclusive"

# File signatures: the accepted formats, and a few others so a refusal can say what was sent.
_ACCEPTED_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))
_OTHER_SIGNATURES = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
                     (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"), (b"%PDF", "PDF"),
                     (b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"))
_FTYP_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF"}
# What PIL raises on damaged headers or pixel data besides OSError.
_PIL_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
_BOX_PROBLEM = re.compile(r"row \d+: `?box")  # how a refusal tells a row's box problems from its image problems


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: taskset / cgroup cpusets), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads(cores: int | None = None) -> int:
    """torch intra-op threads per forward when CARSML_SERVE_THREADS is unset: every usable core (one inference thread).

    Measured on a quiet 2-core machine (benchmarks/serving.py, docs/serving.md): with both cores on one forward the
    served p50 for one image was 0.95x the bare forward, with one core 1.95x; batch-32 throughput was 0.81x either
    way. On a machine shared with other work the OpenMP threads of one forward wait on each other whenever one is
    preempted (served p50 ~4.7x, p95 ~37x measured so): set CARSML_SERVE_THREADS to half the cores there, which also
    gives a second inference thread (a batch is split across them).
    """
    return max(1, cores or usable_cores())


def serve_threads(environ: Mapping[str, str] | None = None) -> int:
    """torch intra-op threads per forward: CARSML_SERVE_THREADS (a positive integer) or `default_threads()`."""
    raw = (os.environ if environ is None else environ).get(SERVE_THREADS_ENV, "").strip()
    if not raw:
        return default_threads()
    try:
        threads = int(raw)
    except ValueError:
        threads = 0
    if threads < 1:
        raise MlflowException.invalid_parameter_value(
            f"{SERVE_THREADS_ENV}={raw!r} is invalid: expected a positive whole number of torch threads per forward "
            f"pass (unset: {default_threads()} on this machine)")
    return threads


class RequestRefused(MlflowException):
    """A refused request (HTTP 400). MLflow's scoring server rewrites an error's message to "Failed to predict data
    '<the whole request frame>'. Error: <message>", which for a large request is hundreds of characters of raw bytes
    before the sentence that helps; this error keeps its own message, so the body says what to fix and stays short."""

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):  # set once, by MlflowException.__init__; the server's rewrite is ignored
            self._message = value


def _bad(message: str) -> MlflowException:
    return RequestRefused(message, error_code=INVALID_PARAMETER_VALUE)


def sniff_format(data: bytes) -> str | None:
    """'JPEG' or 'PNG' from the file's signature; None for anything else."""
    for signature, name in _ACCEPTED_SIGNATURES:
        if data.startswith(signature):
            return name
    return None


def _other_format(data: bytes) -> str | None:
    """The name of a recognisable non-accepted image format, for the refusal message."""
    for signature, name in _OTHER_SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(data[8:12])
    return None


def parse_box(value: object, row: int) -> tuple[int, int, int, int] | None:
    """A row's `box` cell: None (null / NaN / absent: the whole image) or four whole numbers x1 < x2, y1 < y2.
    Errors name the row; whether the box meets the image is checked against its header (`open_image`)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise _bad(f"row {row}: `box` must be null or {BOX_FORMAT}; got {type(value).__name__} {value!r:.60}")
    if len(value) != 4:
        raise _bad(f"row {row}: `box` must have 4 numbers, {BOX_FORMAT}; got {len(value)}")
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v == int(v)
               for v in value):
        raise _bad(f"row {row}: `box` must be 4 whole numbers, {BOX_FORMAT}; got {list(value)!r:.80}")
    x1, y1, x2, y2 = (int(v) for v in value)
    if x2 <= x1 or y2 <= y1:
        raise _bad(f"row {row}: `box` {[x1, y1, x2, y2]} is empty: expected x1 < x2 and y1 < y2 ({BOX_FORMAT})")
    return x1, y1, x2, y2


def _plan(img: Image.Image, box: tuple[int, int, int, int] | None, policy: BoxPolicy, size: int,
          row: int) -> CropPlan:
    """`plan_crop` with the model's box policy, as the training cache plans its rows: the box grown by the margin
    when the model was trained on boxes; else the whole image (the box is still checked against the image)."""
    try:
        if box is not None and not policy.use_boxes:
            box_region(img, box, 0.0, f"row {row}")
            box = None
        return plan_crop(img, box, size, policy.margin, f"row {row}")
    except DataError as exc:  # the box lies outside the image (the training decoder's message, naming the row)
        raise _bad(str(exc)) from None


class OpenedImage(NamedTuple):
    """A row whose header passed every check: the lazily opened image and how it will be decoded."""

    image: Image.Image
    plan: CropPlan | None  # None: planned when decoded (a PNG whose EXIF orientation needs its pixels)
    pixels: int  # pixels the decoder will produce (a drafted JPEG at its reduced scale)
    box: tuple[int, int, int, int] | None = None
    policy: BoxPolicy = BoxPolicy()


def min_side(size: int) -> int:
    """The shortest side (pixels) of an image or box that a model of input `size` classifies: 1/MIN_SIDE_FRACTION of
    it. Smaller, the crop is blown up more than that many times and its label would be a guess (a 1x1 image got a
    confident one)."""
    return max(1, -(-size // MIN_SIDE_FRACTION))


def _check_visible(width: int, height: int, size: int, row: int, what: str) -> None:
    if min(width, height) < min_side(size):
        raise _bad(f"row {row}: {what} is {width}x{height}; this model ({size} px input) needs at least "
                   f"{min_side(size)} px on the shorter side (1/{MIN_SIDE_FRACTION} of its input): smaller, its "
                   "label would be a guess")


def open_image(text: object, row: int, size: int, box: tuple[int, int, int, int] | None = None,
               policy: BoxPolicy = BoxPolicy()) -> OpenedImage:
    """Check one row from its header only (nothing is decoded): a non-empty base64 string of at most MAX_IMAGE_BYTES,
    a JPEG or PNG by its signature, at most MAX_PIXELS and at least `min_side` on its shorter side (its box too), a
    `box` (from `parse_box`) that meets the image; plan its
    decode to size x size with the model's box `policy`. Errors name the row."""
    if isinstance(text, (bytes, bytearray, memoryview)) and len(text):  # the `binary` column, decoded by the server
        if len(text) > MAX_IMAGE_BYTES:
            raise _bad(f"row {row}: image is larger than {MAX_IMAGE_BYTES // MIB} MiB")
        data = bytes(text)
    elif isinstance(text, str) and text:  # base64 text: an in-process caller, or a client of the string column
        if len(text) * 3 // 4 > MAX_IMAGE_BYTES:
            raise _bad(f"row {row}: image is larger than {MAX_IMAGE_BYTES // MIB} MiB")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(f"row {row}: `image` is not valid base64") from None
    else:
        raise _bad(f"row {row}: `image` must be the non-empty bytes of a JPEG or PNG file (base64 in JSON)")
    fmt = sniff_format(data)
    if fmt is None:
        other = _other_format(data)
        if other is not None:
            raise _bad(f"row {row}: `image` is a {other} file; only {FORMATS} images are accepted")
        raise _bad(f"row {row}: `image` bytes are not a readable JPEG/PNG image")
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])  # the header only
    except Image.DecompressionBombError:  # PIL refuses > 2 x its own limit before our size check can run
        raise _bad(f"row {row}: image has more than {MAX_PIXELS:,} pixels") from None
    except _PIL_ERRORS:
        raise _bad(f"row {row}: `image` bytes are not a readable JPEG/PNG image") from None
    try:
        if img.width * img.height > MAX_PIXELS:
            raise _bad(f"row {row}: image is {img.width}x{img.height}, more than {MAX_PIXELS:,} pixels")
        _check_visible(img.width, img.height, size, row, "image")
        if box is not None:
            _check_visible(box[2] - box[0], box[3] - box[1], size, row, "`box`")
        later = box is not None and orientation_needs_decode(img)  # a PNG decodes in full anyway: same pixel count
        plan = None if later else _plan(img, box, policy, size, row)
        return OpenedImage(img, plan, img.width * img.height, box, policy)
    except MlflowException:
        img.close()
        raise
    except _PIL_ERRORS:  # a header PIL parsed but cannot plan (e.g. a broken EXIF block it cannot skip)
        img.close()
        raise _bad(f"row {row}: `image` bytes are not a readable JPEG/PNG image") from None


def finish_image(opened: OpenedImage, row: int, size: int) -> np.ndarray:
    """Decode a row checked by `open_image` into uint8 size x size x 3 (the training decoder); closes the image."""
    try:
        plan = opened.plan if opened.plan is not None else _plan(opened.image, opened.box, opened.policy, size, row)
        return finish_crop(opened.image, plan, size, f"row {row}")
    except (DataError, *_PIL_ERRORS):
        raise _bad(f"row {row}: `image` bytes are not a readable JPEG/PNG image (corrupt or truncated pixel data)"
                   ) from None
    finally:
        opened.image.close()


def decode_image(text: object, row: int, size: int, box: object = None, policy: BoxPolicy = BoxPolicy()) -> np.ndarray:
    """Base64 text (and a `box` cell) → RGB uint8 array of size x size, as training decodes; errors name the row."""
    return finish_image(open_image(text, row, size, parse_box(box, row), policy), row, size)


def _refusal(problems: dict[int, str], rows: int) -> MlflowException:
    bad = sorted(problems)
    listed = ", ".join(map(str, bad[:100])) + (", ..." if len(bad) > 100 else "")
    details = "; ".join(problems[row] for row in bad[:MAX_ROWS_DESCRIBED])
    if len(bad) > MAX_ROWS_DESCRIBED:
        details += f"; ... ({len(bad) - MAX_ROWS_DESCRIBED} more)"
    boxes = sum(bool(_BOX_PROBLEM.match(message)) for message in problems.values())
    what = "`image`" if not boxes else "`box`" if boxes == len(bad) else "`image` or `box`"
    return _bad(f"{len(bad)} of {rows} row(s) have a bad {what} (row {listed}); the request was refused as a whole, "
                f"nothing was predicted: {details}")


def encoded_bytes(value: object) -> int:
    """The file size a row's `image` cell stands for: its bytes, or what its base64 text decodes to (0 for
    anything else, refused per row later)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    return len(value) * 3 // 4 if isinstance(value, str) else 0


def check_request(values: list[object]) -> None:
    """The per-request limits that need no decoding at all: MAX_ROWS and MAX_REQUEST_BYTES."""
    if len(values) > MAX_ROWS:
        raise _bad(f"the request has {len(values)} rows, more than the {MAX_ROWS} allowed per request; the request "
                   f"was refused as a whole, nothing was predicted: send at most {MAX_ROWS} images per request")
    total = sum(encoded_bytes(v) for v in values)
    if total > MAX_REQUEST_BYTES:
        raise _bad(f"the request's images have {total / MIB:.1f} MiB in all, more than the "
                   f"{MAX_REQUEST_BYTES // MIB} MiB allowed per request; the request was refused as a whole, "
                   f"nothing was predicted: send fewer or smaller images")


def decode_images(values: pd.Series | Iterable[object], size: int, pool: ThreadPoolExecutor | None = None,
                  boxes: Iterable[object] | None = None, policy: BoxPolicy = BoxPolicy()) -> np.ndarray:
    """Check every row, then decode them all into one N x size x size x 3 uint8 batch (on `pool` when given).

    `boxes`: one `box` cell per row (see `parse_box`), applied with the model's box `policy`; None: no boxes.

    Nothing is decoded until every row's header has passed and the request is within MAX_ROWS, MAX_REQUEST_BYTES and
    MAX_REQUEST_PIXELS; any failure refuses the whole request with one MlflowException(INVALID_PARAMETER_VALUE) that
    names every bad row index and what is wrong with (the first MAX_ROWS_DESCRIBED of) them, or states the limit.
    """
    values = list(values)
    check_request(values)
    cells = [None] * len(values) if boxes is None else list(boxes)
    opened: dict[int, OpenedImage] = {}
    problems: dict[int, str] = {}
    try:
        for row, (value, cell) in enumerate(zip(values, cells, strict=True)):
            try:
                opened[row] = open_image(value, row, size, parse_box(cell, row), policy)
            except MlflowException as exc:
                problems[row] = exc.message
        if problems:
            raise _refusal(problems, len(values))
        pixels = sum(o.pixels for o in opened.values())
        if pixels > MAX_REQUEST_PIXELS:
            raise _bad(f"the request's {len(values)} images have {pixels:,} pixels to decode in all, more than the "
                       f"{MAX_REQUEST_PIXELS:,} allowed per request (a JPEG at least twice the model's input size "
                       f"counts at the reduced scale it is decoded at); the request was refused as a whole, nothing "
                       f"was predicted: send fewer or smaller images")

        def one(row: int) -> np.ndarray | str:
            try:
                return finish_image(opened.pop(row), row, size)
            except MlflowException as exc:
                return exc.message

        # small images side by side on the pool (PIL releases the GIL while decoding); large ones one at a time, so
        # that at most one large image is in memory at once
        small = [row for row, item in opened.items() if item.pixels <= PARALLEL_DECODE_MAX_PIXELS]
        results: dict[int, np.ndarray | str] = {}
        if pool is not None and len(small) > 1:
            results.update(zip(small, pool.map(one, small), strict=True))
        for row in range(len(values)):
            if row not in results:
                results[row] = one(row)
        problems = {row: r for row, r in results.items() if isinstance(r, str)}
        if problems:
            raise _refusal(problems, len(values))
        return np.stack([results[row] for row in range(len(values))])
    finally:
        for item in list(opened.values()):  # rows never decoded (a refusal): release their bytes
            item.image.close()


class CarsImageClassifier(mlflow.pyfunc.PythonModel):
    """Serves a carsml network (bundle artifact) — predictions for a batch of JPEG / PNG images."""

    policy: BoxPolicy = BoxPolicy()  # the model's box policy (its bundle info)
    threads: int = 1  # torch intra-op threads per forward (CARSML_SERVE_THREADS)
    slots: int = 1  # inference threads: forwards (or parts of one batch) that run at once; threads x slots <= cores
    decode_threads: int = 1  # images decoded at once within a request
    _infer: ThreadPoolExecutor | None = None
    _decode: ThreadPoolExecutor | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from carsml.data.transforms import build_transform
        from carsml.tracking.models import load_bundle

        self.start_threads()
        # loaded on an inference thread: torch work of the process happens on those threads only (one OpenMP team each)
        self.model, self.info = self.run_torch(load_bundle, context.artifacts["bundle"])
        self.class_names = self.info["class_names"]
        self.size = int(self.info["image_size"])
        self.policy = box_policy(self.info)
        self.transform = build_transform("none", mean=self.info["mean"], std=self.info["std"])

    def start_threads(self) -> None:
        """Create the inference threads (CARSML_SERVE_THREADS torch threads each) and the decoding pool."""
        for pool in (self._infer, self._decode):  # loaded again: the old threads end once idle
            if pool is not None:
                pool.shutdown(wait=False)
        cores = usable_cores()
        self.threads = serve_threads()
        self.slots = max(1, cores // self.threads)
        self.decode_threads = min(cores, MAX_DECODE_THREADS)
        outside = torch.get_num_threads()  # what the rest of the process uses, kept after the pool is set up
        threads, started = self.threads, threading.Barrier(self.slots + 1)  # (init must not hold on to `self`)

        def init() -> None:
            # torch sets up a thread's OpenMP size lazily, from the process default, on its first use; do that first,
            # or the restore below would overwrite this thread's setting on its first forward
            torch.get_num_threads()
            torch.set_num_threads(threads)  # this thread's OpenMP team size (and torch's process default...)
            started.wait(timeout=120)

        self._infer = ThreadPoolExecutor(self.slots, thread_name_prefix="carsml-infer", initializer=init)
        for _ in range(self.slots):  # start every inference thread now, so none changes the setting later
            self._infer.submit(int)
        started.wait(timeout=120)  # BrokenBarrierError rather than a hang if a thread failed to start
        torch.set_num_threads(outside)  # ... which is restored here: only the inference threads use `threads`
        self._decode = (ThreadPoolExecutor(self.decode_threads, thread_name_prefix="carsml-decode")
                        if self.decode_threads > 1 else None)
        for pool in (self._infer, self._decode):
            if pool is not None:  # idle threads end when the model is dropped (tests load many models)
                weakref.finalize(self, pool.shutdown, wait=False)

    def run_torch(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on an inference thread (directly when none was started, e.g. in a bare instance)."""
        if self._infer is None:
            return fn(*args)
        return self._infer.submit(fn, *args).result()

    def run_batched(self, fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
        """`fn(images)` for a batch, split into one part per inference thread that run side by side (each with
        `threads` torch threads and no OpenMP barrier between them); the parts' outputs concatenated in order."""
        parts = min(self.slots, len(images)) if self._infer is not None else 1
        if parts <= 1:
            return self.run_torch(fn, images)
        futures = [self._infer.submit(fn, part) for part in np.array_split(images, parts)]
        return np.concatenate([future.result() for future in futures])

    def infer(self, images: np.ndarray, features: bool = False) -> Prediction:
        """The engine's `predict` (float32, NCHW, this thread) for uint8 N x H x W x 3 images: the inference path of
        evaluation, so decoded training images give exactly their evaluation probabilities."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        return engine_predict(self.model, x, self.transform, batch_size=MAX_ROWS, amp=SERVE_AMP,
                              channels_last=SERVE_CHANNELS_LAST, features=features)

    def features_and_probs(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities for uint8 N x H x W x 3 images (split across the inference threads)."""
        return self.run_batched(lambda part: self.infer(part).probs, images)

    def decode_frame(self, model_input: pd.DataFrame) -> np.ndarray:
        """Validate the request frame and decode its images (cropped to their boxes per the box policy) into one
        batch."""
        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            raise _bad("input must be a DataFrame with a column `image` (JPEG/PNG bytes, base64 in JSON)")
        if len(model_input) == 0:
            raise _bad("input frame is empty: send at least one row")
        boxes = model_input["box"].tolist() if "box" in model_input.columns else None
        return decode_images(model_input["image"], self.size, self._decode, boxes, self.policy)

    def format(self, probs: np.ndarray) -> pd.DataFrame:
        """Rows of label / class_id / score / top-5 from probabilities."""
        top = np.argsort(-probs, axis=1, kind="stable")[:, :5]  # ties (forest vote shares) -> lowest class id
        return pd.DataFrame({
            "label": [self.class_names[t[0]] for t in top],
            "class_id": top[:, 0].astype(np.int64),
            "score": probs[np.arange(len(probs)), top[:, 0]].astype(np.float64),
            "top5_labels": [[self.class_names[j] for j in t] for t in top],
            "top5_scores": [[round(float(p[j]), 6) for j in t] for p, t in zip(probs, top, strict=True)],
        })

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ANN001
        return self.format(self.features_and_probs(self.decode_frame(model_input)))


mlflow.models.set_model(CarsImageClassifier())
