"""Drawing the synthetic cars and big trucks: side views in car units on a `_Canvas`.

A car is drawn from its class `_Design` (body, cabin, trim, lights and grille, spoiler / rack / bed, wheels and
rims) facing right, x along the car and y up from the ground, both in units of the car length; the big trucks of
the extra class get a random `_Truck` shape. Placing the drawing in a frame is `carsml.data.synthetic_scenes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import ImageDraw

from carsml.data.synthetic_designs import _TEMPLATES, _Design

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
