"""Composing a synthetic photo: a drawn object placed in a cluttered scene, then lit and noised.

Background (sky and ground gradients, clutter shapes), body colour, placement (position, scale, camera elevation,
a sloped road, facing direction, optionally cut by the frame edge), a shadow, occluders, blur, lighting and sensor
noise. Nothing here carries class information: it is the per-image nuisance of every class alike.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from carsml.data.synthetic_drawing import _Canvas


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Sky and ground gradients with random clutter shapes."""
    horizon = int(h * rng.uniform(0.3, 0.75))
    top, mid, ground, far = (rng.uniform(60, 250, 3) for _ in range(4))
    arr = np.empty((h, w, 3), np.float32)
    s = np.linspace(0.0, 1.0, max(horizon, 1))[:, None, None]
    arr[:horizon] = top * (1 - s) + mid * s
    g = np.linspace(0.0, 1.0, max(h - horizon, 1))[:, None, None]
    arr[horizon:] = far * (1 - g) + ground * g
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 10))):
        col = tuple(int(v) for v in rng.integers(20, 250, 3))
        kind = rng.integers(3)
        x, y = float(rng.uniform(-0.1, 1.0) * w), float(rng.uniform(0.0, 1.0) * h)
        sw, sh = float(rng.uniform(0.05, 0.4) * w), float(rng.uniform(0.05, 0.5) * h)
        if kind == 0:
            draw.rectangle([x, y, x + sw, y + sh], fill=col)
        elif kind == 1:
            draw.ellipse([x, y, x + sw, y + sh], fill=col)
        else:
            draw.line([x, y, x + sw, y + float(rng.uniform(-0.3, 0.3)) * h], fill=col,
                      width=int(rng.integers(1, 4)))
    return img


def _random_colour(rng: np.random.Generator) -> tuple:
    """Body colour: uniform over saturated, pastel, dark and near-white paints; never class information."""
    base = rng.uniform(0, 255, 3)
    if rng.random() < 0.3:  # grey-scale paints (white, silver, black) are common on real cars
        base = np.full(3, rng.uniform(15, 245))
    return tuple(int(v) for v in base)


def _render(rng: np.random.Generator, w: int, h: int, height_units: float, draw_fn: Callable[[_Canvas], None],
            edge_fraction: float | None) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Draw an object over a cluttered background. Returns the image and the 0-based exclusive box.

    With probability `edge_fraction` the object is cut by the frame edge; None: never (and no draw for it).
    """
    bg = _background(rng, w, h)
    squash = float(rng.uniform(0.9, 1.1))
    fit = min(0.92 * w, 0.85 * h / (height_units * squash))
    length = fit * float(rng.uniform(0.6, 1.0))
    obj_h = length * height_units * squash
    margin = 2.0
    x0 = float(rng.uniform(margin, max(margin, w - length - margin)))
    ground = float(rng.uniform(min(obj_h + margin, h - margin), h - margin))
    if edge_fraction is not None and rng.random() < edge_fraction:
        cut = float(rng.uniform(0.03, 0.12))
        side = int(rng.integers(3))
        if side == 0:
            x0 = -cut * length
        elif side == 1:
            x0 = w - (1 - cut) * length
        else:
            ground = h + cut * obj_h
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw_fn(_Canvas(ImageDraw.Draw(layer), x0, ground, length, squash))
    # A slightly sloped road, then the facing direction.
    layer = layer.rotate(float(rng.uniform(-3.0, 3.0)), resample=Image.Resampling.BILINEAR,
                         center=(x0 + length / 2, ground))
    if rng.random() < 0.5:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    box = layer.getchannel("A").getbbox()
    assert box is not None, "the object was drawn outside the frame"
    draw = ImageDraw.Draw(bg)
    sh = max(2.0, 0.05 * length)
    draw.ellipse([box[0] - 0.03 * length, box[3] - sh, box[2] + 0.03 * length, box[3] + sh],
                 fill=tuple(int(v) for v in rng.integers(10, 50, 3)))
    bg.paste(layer, (0, 0), layer)
    if rng.random() < 0.2:
        _occluder(rng, draw, box)
    if rng.random() < 0.3:
        bg = bg.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    return _finish(rng, bg), box


def _occluder(rng: np.random.Generator, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int]) -> None:
    """Something in front of the car (a pole or a bush) hiding part of it; the box still spans the car."""
    x1, y1, x2, y2 = box
    col = tuple(int(v) for v in rng.integers(20, 230, 3))
    x = float(rng.uniform(x1, x2))
    if rng.random() < 0.5:
        half = max(1.0, float(rng.uniform(0.01, 0.035)) * (x2 - x1))
        draw.rectangle([x - half, 0, x + half, y2 + 2], fill=col)
    else:
        rx, ry = float(rng.uniform(0.08, 0.2)) * (x2 - x1), float(rng.uniform(0.15, 0.4)) * (y2 - y1)
        draw.ellipse([x - rx, y2 - ry, x + rx, y2 + ry], fill=col)


def _finish(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    """Lighting (brightness and colour cast) and sensor noise."""
    gain = (float(rng.uniform(0.6, 1.3)) * rng.uniform(0.93, 1.07, 3)).astype(np.float32)
    arr = np.asarray(img, np.float32) * gain
    noise = rng.standard_normal(arr.shape, dtype=np.float32)
    noise *= float(rng.uniform(0.0, 6.0))
    arr += noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
