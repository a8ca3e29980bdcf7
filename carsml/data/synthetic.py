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
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io as sio
from PIL import Image, ImageDraw, ImageFilter

from carsml.errors import ConfigError

# Bump when the drawing or layout changes: it is part of the cache key of `ensure_synthetic`.
GENERATOR_VERSION = 1
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

_MAKES = ["Vexa", "Ordan", "Kestrel", "Marlo", "Tavira", "Quell", "Brisca", "Halden",
          "Sorin", "Ivra", "Norvik", "Castell", "Zephra", "Lumo", "Drava", "Pellan"]
_MODELS = ["Corsa", "Lumen", "Ridge", "Atlas", "Sable", "Vento", "Tundro", "Mira",
           "Oslo", "Fenix", "Strada", "Calla", "Rovik", "Nimbus", "Terra", "Quarto"]


# ----------------------------------------------------------------------------------------------- designs


@dataclass(frozen=True)
class _Template:
    """Proportions of one body type, in units of the car length (y up from the ground)."""

    clearance: float
    body_h: float
    cabin_h: float
    cabin: tuple[float, float, float, float]  # rear base, rear top, front top, front base (x)
    hood_drop: float
    tail_drop: float
    wheel_r: float
    wheel_x: tuple[float, float]  # rear, front
    windows: tuple[int, ...]
    roofs: tuple[str, ...]
    extra: str  # "spoiler", "rack" or "bed": what the `extra` attribute adds


_TEMPLATES: dict[str, _Template] = {
    "Sedan": _Template(0.05, 0.14, 0.12, (0.22, 0.33, 0.60, 0.73), 0.03, 0.02, 0.085, (0.19, 0.80),
                       (2, 3), ("flat", "arched", "sloped"), "spoiler"),
    "Coupe": _Template(0.04, 0.12, 0.105, (0.19, 0.37, 0.58, 0.71), 0.03, 0.02, 0.085, (0.19, 0.81),
                       (1, 2), ("flat", "arched", "sloped"), "spoiler"),
    "SUV": _Template(0.075, 0.17, 0.15, (0.03, 0.06, 0.66, 0.77), 0.03, 0.0, 0.095, (0.18, 0.81),
                     (2, 3), ("flat", "arched"), "rack"),
    "Hatchback": _Template(0.05, 0.15, 0.14, (0.04, 0.13, 0.62, 0.74), 0.03, 0.0, 0.09, (0.17, 0.82),
                           (1, 2), ("flat", "arched", "sloped"), "spoiler"),
    "Wagon": _Template(0.05, 0.14, 0.12, (0.03, 0.05, 0.60, 0.72), 0.03, 0.01, 0.085, (0.18, 0.80),
                       (2, 3), ("flat", "arched"), "rack"),
    "Crew Cab": _Template(0.08, 0.16, 0.14, (0.40, 0.42, 0.66, 0.75), 0.03, 0.0, 0.095, (0.17, 0.81),
                          (1, 2), ("flat", "arched"), "bed"),
    "Van": _Template(0.06, 0.16, 0.20, (0.02, 0.03, 0.78, 0.92), 0.05, 0.0, 0.085, (0.16, 0.83),
                     (2, 3), ("flat", "arched"), "rack"),
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "rim": ("disc", "hub", "ring", "cross", "gold"),
    "head": ("round", "rect", "slit", "tall"),
    "tail": ("rect", "round", "vbar", "strip"),
    "grille": ("hbars", "vbars", "mesh", "chrome"),
    "trim": ("none", "sill", "belt", "stripe"),
}
_WHEEL_SIZES = (0.85, 1.0, 1.17)
# A model comes in other bodies only within one group (a sedan gets a coupe or wagon, not a van).
_BODY_GROUPS = (("Sedan", "Coupe", "Hatchback", "Wagon"), ("SUV", "Crew Cab", "Van"))
# Details a later model year changes (two of them), keeping the pair visually close.
_YEAR_DETAILS = ("head", "tail", "grille", "trim")
# Per image, a car may carry another option package (rims, trim, spoiler/rack): variation within a class.
_OPTION_DETAILS = ("rim", "trim", "extra")
OPTION_FRACTION = 0.15
_MIN_FAMILY_DISTANCE = 2
_DISCRETE = ("rim", "head", "tail", "grille", "trim", "roof", "windows", "extra", "wheel_size")


@dataclass(frozen=True)
class _Design:
    """Everything that identifies a class visually (colour excluded: it is a per-image nuisance)."""

    body: str
    clearance: float
    body_h: float
    cabin_h: float
    cabin: tuple[float, float, float, float]
    wheel_r: float
    wheel_x: tuple[float, float]
    wheel_size: int
    rim: str
    head: str
    tail: str
    grille: str
    trim: str
    roof: str
    windows: int
    extra: bool
    stripe_light: bool

    def distance(self, other: _Design) -> int:
        """Number of discrete details that differ."""
        return sum(getattr(self, k) != getattr(other, k) for k in _DISCRETE)


@dataclass(frozen=True)
class _CarClass:
    name: str
    family: str
    design: _Design
    variant_of: str | None  # the class this one is a year/body variant of


def _pick(rng: np.random.Generator, options: tuple) -> Any:
    return options[int(rng.integers(len(options)))]


def _sample_details(rng: np.random.Generator, body: str) -> dict[str, Any]:
    t = _TEMPLATES[body]
    details = {k: _pick(rng, v) for k, v in _CHOICES.items()}
    details.update(roof=_pick(rng, t.roofs), windows=_pick(rng, t.windows), extra=bool(rng.random() < 0.4),
                   wheel_size=int(rng.integers(len(_WHEEL_SIZES))), stripe_light=bool(rng.random() < 0.5))
    return details


def _make_design(rng: np.random.Generator, body: str, details: dict[str, Any]) -> _Design:
    """Proportions of a family: the body template, jittered, plus the discrete details."""
    t = _TEMPLATES[body]
    shift = float(rng.uniform(-0.025, 0.025))
    cabin = tuple(min(0.97, max(0.01, x + shift)) for x in t.cabin)
    return _Design(
        body=body,
        clearance=t.clearance * float(rng.uniform(0.9, 1.1)),
        body_h=t.body_h * float(rng.uniform(0.93, 1.07)),
        cabin_h=t.cabin_h * float(rng.uniform(0.9, 1.1)),
        cabin=cabin,  # type: ignore[arg-type]
        wheel_r=t.wheel_r * _WHEEL_SIZES[details["wheel_size"]],
        wheel_x=(t.wheel_x[0] + float(rng.uniform(-0.02, 0.02)),
                 t.wheel_x[1] + float(rng.uniform(-0.02, 0.02))),
        **details,
    )


def _year_variant(rng: np.random.Generator, base: _Design) -> _Design:
    """A later model year: two details change, proportions barely move."""
    changed = rng.choice(len(_YEAR_DETAILS), size=2, replace=False)
    new: dict[str, Any] = {}
    for i in changed:
        key = _YEAR_DETAILS[int(i)]
        options = tuple(o for o in _CHOICES[key] if o != getattr(base, key))
        new[key] = _pick(rng, options)
    cabin = tuple(x + 0.015 for x in base.cabin)
    return replace(base, cabin=cabin, **new)  # type: ignore[arg-type]


def _body_variant(rng: np.random.Generator, base: _Design, body: str) -> _Design:
    """The same model in another body: same details (where the body allows them), new proportions."""
    t = _TEMPLATES[body]
    details = {k: getattr(base, k) for k in (*_CHOICES, "extra", "wheel_size", "stripe_light")}
    details["roof"] = base.roof if base.roof in t.roofs else t.roofs[0]
    details["windows"] = base.windows if base.windows in t.windows else t.windows[0]
    return _make_design(rng, body, details)


def _family_names(rng: np.random.Generator, count: int) -> list[str]:
    combos = [f"{make} {model}" for make in _MAKES for model in _MODELS]
    order = rng.permutation(len(combos))
    # Beyond 256 families the names repeat with a generation suffix, keeping them unique.
    return [combos[int(order[f % len(combos)])] + (f" Mk{f // len(combos) + 1}" if f >= len(combos) else "")
            for f in range(count)]


def _class_designs(num_classes: int, seed: int) -> list[_CarClass]:
    """The classes: families of 1 or 2 classes (year pair or body pair), body types spread evenly."""
    rng = np.random.default_rng([seed, _S_DESIGN])
    bodies = list(_TEMPLATES)
    names = _family_names(rng, num_classes)
    classes: list[_CarClass] = []
    by_body: dict[str, list[_Design]] = {b: [] for b in bodies}
    body_cycle = [bodies[int(i)] for i in rng.permutation(len(bodies))]
    family = 0
    while len(classes) < num_classes:
        body = body_cycle[family % len(body_cycle)]
        design = _distinct_design(rng, body, by_body[body])
        by_body[body].append(design)
        fam = names[family]
        year = int(rng.integers(2000, 2010))
        kind = rng.random() if num_classes - len(classes) >= 2 else 1.0
        base = _CarClass(f"{fam} {body} {year}", fam, design, None)
        classes.append(base)
        if kind < 0.3:  # same model, later year: visually close on purpose
            later = year + int(rng.integers(2, 6))
            classes.append(_CarClass(f"{fam} {body} {later}", fam, _year_variant(rng, design), base.name))
        elif kind < 0.45:  # same model and year, another body
            group = next(g for g in _BODY_GROUPS if body in g)
            other = _pick(rng, tuple(b for b in group if b != body))
            variant = _body_variant(rng, design, other)
            by_body[other].append(variant)
            classes.append(_CarClass(f"{fam} {other} {year}", fam, variant, base.name))
        family += 1
    return classes


def _distinct_design(rng: np.random.Generator, body: str, same_body: list[_Design]) -> _Design:
    """A new family design differing in enough details from every family of the same body (best of 60)."""
    best, best_d = None, -1
    for _ in range(60):
        cand = _make_design(rng, body, _sample_details(rng, body))
        d = min((cand.distance(o) for o in same_body), default=99)
        if d > best_d:
            best, best_d = cand, d
        if d >= _MIN_FAMILY_DISTANCE:
            break
    assert best is not None
    return best


# ---------------------------------------------------------------------------------------------- drawing


Point = tuple[float, float]


class _Canvas:
    """Maps car units (x along the car, y up from the ground) to frame pixels and draws there."""

    def __init__(self, draw: ImageDraw.ImageDraw, x0: float, ground: float, length: float,
                 squash: float = 1.0) -> None:
        # `squash` scales heights only: a cheap stand-in for camera elevation, so that the height/length
        # ratio of a crop is a weak class cue, as in real photos.
        self.d, self.x0, self.ground, self.L, self.sy = draw, x0, ground, length, squash

    def p(self, x: float, y: float) -> Point:
        return (self.x0 + x * self.L, self.ground - y * self.L * self.sy)

    def poly(self, pts: list[Point], fill: tuple) -> None:
        self.d.polygon([self.p(x, y) for x, y in pts], fill=fill)

    def rect(self, x1: float, y1: float, x2: float, y2: float, fill: tuple) -> None:
        self.poly([(x1, y1), (x2, y1), (x2, y2), (x1, y2)], fill)

    def circle(self, x: float, y: float, r: float, fill: tuple) -> None:
        cx, cy = self.p(x, y)
        rx, ry = max(r * self.L, 0.8), max(r * self.L * self.sy, 0.8)
        self.d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)

    def upper_half_disc(self, x: float, y: float, r: float, fill: tuple) -> None:
        cx, cy = self.p(x, y)
        rx, ry = r * self.L, r * self.L * self.sy
        self.d.pieslice([cx - rx, cy - ry, cx + rx, cy + ry], 180, 360, fill=fill)

    def line(self, pts: list[Point], fill: tuple, width: float) -> None:
        self.d.line([self.p(x, y) for x, y in pts], fill=fill, width=max(1, round(width * self.L)))


_DARK = (22, 22, 24)
_TYRE = (28, 28, 30)
_GLASS = (48, 62, 80)
_CHROME = (200, 204, 210)
_HEAD = (255, 246, 205)
_TAIL = (205, 24, 20)


def _shade(colour: tuple, k: float) -> tuple:
    return tuple(int(min(255, max(0, c * k))) for c in colour)


def _car_height(d: _Design) -> float:
    rack = 0.025 if d.extra and _TEMPLATES[d.body].extra == "rack" else 0.0
    return d.clearance + d.body_h + d.cabin_h * (1.12 if d.roof == "arched" else 1.0) + rack


def _draw_car(c: _Canvas, d: _Design, colour: tuple) -> None:
    """A side view facing right (front at x = 1)."""
    t = d.clearance + d.body_h
    xa, xb, xc, xd = d.cabin
    tpl = _TEMPLATES[d.body]
    c.poly([(0.0, d.clearance + 0.2 * d.body_h), (0.03, d.clearance), (0.96, d.clearance),
            (1.0, d.clearance + 0.3 * d.body_h), (1.0, t - tpl.hood_drop), (xd, t), (xa, t),
            (0.0, t - tpl.tail_drop)], colour)
    _draw_cabin(c, d, colour, t)
    _draw_trim(c, d, colour, t)
    _draw_lights(c, d, t)
    _draw_extra(c, d, colour, t)
    for wx in d.wheel_x:
        c.upper_half_disc(wx, d.wheel_r, d.wheel_r * 1.18, _DARK)
        _draw_wheel(c, d, wx)


def _draw_cabin(c: _Canvas, d: _Design, colour: tuple, t: float) -> None:
    xa, xb, xc, xd = d.cabin
    h = d.cabin_h
    if d.roof == "sloped":  # fastback: the roof starts falling well before the rear pillar
        xb = xb + 0.4 * (xc - xb)
    roof = [(xb, t + h), (xc, t + h)]
    if d.roof == "arched":
        roof = [(xb, t + h), ((xb + xc) / 2, t + h * 1.12), (xc, t + h)]
    c.poly([(xa, t), *roof, (xd, t)], colour)
    # Side glass: between the two slanted pillars, split by `windows - 1` body-coloured posts.
    yb, yt = t + 0.14 * h, t + 0.82 * h
    def rear(y: float) -> float:
        return xa + (xb - xa) * (y - t) / h + 0.02
    def front(y: float) -> float:
        return xd + (xc - xd) * (y - t) / h - 0.02
    c.poly([(rear(yb), yb), (rear(yt), yt), (front(yt), yt), (front(yb), yb)], _GLASS)
    left, right = rear(yt), front(yt)
    for k in range(1, d.windows):
        x = left + (right - left) * k / d.windows
        c.rect(x - 0.011, yb, x + 0.011, yt + 0.01, colour)
        c.line([(x, yb), (x, d.clearance + 0.15 * d.body_h)], _shade(colour, 0.55), 0.008)
    c.line([(front(yb), yb), (front(yb) + 0.01, d.clearance + 0.15 * d.body_h)], _shade(colour, 0.55), 0.008)


def _draw_trim(c: _Canvas, d: _Design, colour: tuple, t: float) -> None:
    bh, cl = d.body_h, d.clearance
    if d.trim == "sill":
        c.rect(0.05, cl, 0.95, cl + 0.22 * bh, _DARK)
    elif d.trim == "belt":
        c.rect(0.02, t - 0.2 * bh, 0.98, t - 0.09 * bh, _CHROME)
    elif d.trim == "stripe":
        c.rect(0.0, cl + 0.42 * bh, 1.0, cl + 0.64 * bh, (235, 235, 235) if d.stripe_light else (18, 18, 18))


def _draw_lights(c: _Canvas, d: _Design, t: float) -> None:
    bh, cl = d.body_h, d.clearance
    y = cl + 0.68 * bh
    if d.head == "round":
        c.circle(0.962, y, 0.032, _HEAD)
    elif d.head == "rect":
        c.rect(0.91, y - 0.025, 1.0, y + 0.02, _HEAD)
    elif d.head == "slit":
        c.poly([(0.85, y + 0.02), (1.0, y + 0.005), (1.0, y - 0.012), (0.86, y + 0.008)], _HEAD)
    else:  # tall
        c.rect(0.955, cl + 0.35 * bh, 1.0, t - 0.05, _HEAD)
    # Grille: the front corner, as a hint of the nose seen slightly from the front.
    gx, gy1, gy2 = 0.955, cl + 0.2 * bh, cl + 0.5 * bh
    if d.grille == "chrome":
        c.rect(gx, gy1, 1.0, gy2, _CHROME)
    else:
        c.rect(gx, gy1, 1.0, gy2, _DARK)
        if d.grille == "hbars":
            for f in (0.33, 0.66):
                yy = gy1 + (gy2 - gy1) * f
                c.line([(gx, yy), (1.0, yy)], _CHROME, 0.008)
        elif d.grille == "vbars":
            c.line([(gx + 0.022, gy1), (gx + 0.022, gy2)], _CHROME, 0.01)
        else:  # mesh
            c.rect(gx + 0.012, gy1 + 0.01, 1.0 - 0.01, gy2 - 0.01, (95, 95, 100))
    ty = cl + 0.7 * bh
    if d.tail == "rect":
        c.rect(0.0, ty - 0.025, 0.05, ty + 0.02, _TAIL)
    elif d.tail == "round":
        c.circle(0.03, ty, 0.028, _TAIL)
    elif d.tail == "vbar":
        c.rect(0.0, cl + 0.3 * bh, 0.03, t - 0.02, _TAIL)
    else:  # strip
        c.rect(0.0, ty - 0.01, 0.14, ty + 0.01, _TAIL)


def _draw_extra(c: _Canvas, d: _Design, colour: tuple, t: float) -> None:
    kind = _TEMPLATES[d.body].extra
    xa, xb, xc, _ = d.cabin
    if kind == "bed":  # the open bed of a pickup is always there; `extra` adds a roll bar
        c.rect(0.03, t - 0.025, xa - 0.02, t - 0.008, _shade(colour, 0.45))
        if d.extra:
            c.line([(xa - 0.05, t), (xa - 0.05, t + 0.06), (xa - 0.005, t + 0.06)], _DARK, 0.012)
    elif not d.extra:
        return
    elif kind == "spoiler":
        c.poly([(0.0, t - 0.01), (0.015, t + 0.035), (0.09, t + 0.035), (0.08, t)], _DARK)
    else:  # roof rack
        top = t + d.cabin_h * (1.12 if d.roof == "arched" else 1.0)
        c.rect(xb + 0.03, top, xc - 0.03, top + 0.018, _DARK)


def _draw_wheel(c: _Canvas, d: _Design, wx: float) -> None:
    r = d.wheel_r
    c.circle(wx, r, r, _TYRE)
    if d.rim == "disc":
        c.circle(wx, r, 0.66 * r, _CHROME)
    elif d.rim == "hub":
        c.circle(wx, r, 0.6 * r, (70, 70, 74))
        c.circle(wx, r, 0.25 * r, _CHROME)
    elif d.rim == "ring":
        c.circle(wx, r, 0.66 * r, _CHROME)
        c.circle(wx, r, 0.42 * r, _TYRE)
        c.circle(wx, r, 0.15 * r, _CHROME)
    elif d.rim == "cross":
        c.circle(wx, r, 0.66 * r, (70, 70, 74))
        k = 0.47 * r
        c.line([(wx - k, r - k), (wx + k, r + k)], _CHROME, 0.16 * r)
        c.line([(wx - k, r + k), (wx + k, r - k)], _CHROME, 0.16 * r)
    else:  # gold
        c.circle(wx, r, 0.66 * r, (196, 150, 40))


@dataclass(frozen=True)
class _Truck:
    """The random shape of one big truck, in car units."""

    wheel_r: float
    box_h: float
    cab_x: float
    cab_h: float
    seams: int
    axles: tuple[float, ...]
    box_colour: tuple | None  # None: painted like the cab

    @property
    def height(self) -> float:
        return 0.05 + self.box_h + 0.05


def _truck_shape(rng: np.random.Generator) -> _Truck:
    r = float(rng.uniform(0.042, 0.052))
    box_h = float(rng.uniform(0.26, 0.34))
    rear_axles = int(rng.integers(2, 5))
    axles = [0.92] + [0.08 + k * 2.3 * r for k in range(rear_axles)] + ([0.45] if rng.random() < 0.5 else [])
    box_colour = tuple(int(v) for v in rng.integers(120, 250, 3)) if rng.random() < 0.5 else None
    return _Truck(r, box_h, float(rng.uniform(0.78, 0.83)), box_h * float(rng.uniform(0.8, 1.0)),
                  int(rng.integers(2, 6)), tuple(axles), box_colour)


def _draw_truck(c: _Canvas, s: _Truck, colour: tuple) -> None:
    """A big truck facing right: long cargo box, cab at the front, several axles."""
    cl, r = 0.05, s.wheel_r
    box_colour = s.box_colour or colour
    c.rect(0.0, cl + 0.02, 1.0, cl + 0.05, _DARK)  # chassis
    c.rect(0.0, cl + 0.05, s.cab_x - 0.015, cl + 0.05 + s.box_h, box_colour)
    for k in range(1, s.seams):  # panel seams of the cargo box
        x = (s.cab_x - 0.015) * k / s.seams
        c.line([(x, cl + 0.06), (x, cl + 0.04 + s.box_h)], _shade(box_colour, 0.7), 0.004)
    c.poly([(s.cab_x, cl + 0.02), (1.0, cl + 0.02), (1.0, cl + s.cab_h * 0.55), (0.985, cl + s.cab_h),
            (s.cab_x, cl + s.cab_h)], colour)
    c.poly([(s.cab_x + 0.06, cl + s.cab_h * 0.58), (0.99, cl + s.cab_h * 0.58), (0.978, cl + s.cab_h * 0.9),
            (s.cab_x + 0.06, cl + s.cab_h * 0.9)], _GLASS)
    c.rect(0.975, cl + 0.04, 1.0, cl + 0.08, _HEAD)
    for x in s.axles:
        c.circle(x, r, r, _TYRE)
        c.circle(x, r, 0.5 * r, _CHROME)


# -------------------------------------------------------------------------------------------- composing


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
            allow_edge: bool) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Draw an object over a cluttered background. Returns the image and the 0-based exclusive box."""
    bg = _background(rng, w, h)
    squash = float(rng.uniform(0.9, 1.1))
    fit = min(0.92 * w, 0.85 * h / (height_units * squash))
    length = fit * float(rng.uniform(0.6, 1.0))
    obj_h = length * height_units * squash
    margin = 2.0
    x0 = float(rng.uniform(margin, max(margin, w - length - margin)))
    ground = float(rng.uniform(min(obj_h + margin, h - margin), h - margin))
    if allow_edge and rng.random() < EDGE_FRACTION:
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
                                    lambda c: _draw_car(c, design, colour), allow_edge=True)
    jpeg, gray = _encode(img, gray_rng, p["grayscale_fraction"])
    edge = x1 == 0 or y1 == 0 or x2 == w or y2 == h
    return _Shot(jpeg, (x1 + 1, y1 + 1, x2, y2), gray, edge)


def _options(rng: np.random.Generator, design: _Design) -> _Design:
    """Another option package for a few images: one of rims, trim or spoiler/rack differs from the class's."""
    if rng.random() >= OPTION_FRACTION:
        return design
    key = _pick(rng, _OPTION_DETAILS)
    if key == "extra":
        return replace(design, extra=not design.extra)
    return replace(design, **{key: _pick(rng, tuple(o for o in _CHOICES[key] if o != getattr(design, key)))})


def _truck_image(index: int, p: dict[str, Any]) -> tuple[bytes, bool]:
    rng = np.random.default_rng([p["seed"], _S_EXTRA, index])
    gray_rng = np.random.default_rng([p["seed"], _S_EXTRA, index, 1])
    colour = _random_colour(rng)
    shape = _truck_shape(rng)
    w, h = p["frame_size"]
    img, _ = _render(rng, w, h, shape.height, lambda c: _draw_truck(c, shape, colour), allow_edge=False)
    return _encode(img, gray_rng, p["grayscale_fraction"])


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
    return [c.name for c in _class_designs(num_classes, seed)]


def generate_synthetic(out_dir: Path, *, num_classes: int = 20, images_per_class: int = 60,
                       test_fraction: float = 0.5, frame_size: tuple[int, int] = (160, 120), seed: int = 0,
                       extra_class_images: int = 100, extra_class_name: str = "BIG_TRUCKS",
                       grayscale_fraction: float = 0.03) -> Path:
    """Write a synthetic dataset in Stanford Cars devkit layout under out_dir; return out_dir/'stanford_cars'.

    `torchvision.datasets.StanfordCars(root=out_dir, split=...)` loads it unchanged. Images of one extra class
    (big trucks, no boxes) go to out_dir/<extra_class_name>/. `stanford_cars/synthetic.json` (parameters and
    counts) is written last, so its presence means the dataset is complete. Refuses (ConfigError) to write
    into an existing non-empty dataset folder rather than mixing two generations.
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

    classes = _class_designs(p["num_classes"], p["seed"])
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
        for i in range(p["extra_class_images"]):
            jpeg, gray = _truck_image(i, p)
            _atomic_write(extra_dir / f"{i + 1:05d}.jpg", jpeg)
            stats["grayscale"] += gray

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
