"""Class designs of the synthetic dataset: what makes one car class look different from another.

Body templates (proportions per body type), the discrete details a class is told apart by (wheel size and rim, head
and tail lights, grille, trim, roof line, windows, spoiler / rack / roll bar), the families of one or two classes
(a later model year changing two details, or the same model in another body) with their names, and the per-image
option packages that vary within a class. Colour is not part of a design: it is a per-image nuisance.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

_MAKES = ["Vexa", "Ordan", "Kestrel", "Marlo", "Tavira", "Quell", "Brisca", "Halden",
          "Sorin", "Ivra", "Norvik", "Castell", "Zephra", "Lumo", "Drava", "Pellan"]
_MODELS = ["Corsa", "Lumen", "Ridge", "Atlas", "Sable", "Vento", "Tundro", "Mira",
           "Oslo", "Fenix", "Strada", "Calla", "Rovik", "Nimbus", "Terra", "Quarto"]


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


def _class_designs(rng: np.random.Generator, num_classes: int) -> list[_CarClass]:
    """The classes: families of 1 or 2 classes (year pair or body pair), body types spread evenly.

    `rng` is the design stream of a generation: it decides the classes and nothing else.
    """
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


def _options(rng: np.random.Generator, design: _Design) -> _Design:
    """Another option package for a few images: one of rims, trim or spoiler/rack differs from the class's."""
    if rng.random() >= OPTION_FRACTION:
        return design
    key = _pick(rng, _OPTION_DETAILS)
    if key == "extra":
        return replace(design, extra=not design.extra)
    return replace(design, **{key: _pick(rng, tuple(o for o in _CHOICES[key] if o != getattr(design, key)))})
