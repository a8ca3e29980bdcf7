"""The structure of a Stanford Cars class name: `<Make> <Model> <Body> <Year>`, and how two class names relate
(same make and model but another year, another body, ...): what tells a fine-grained error from a coarse one."""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

# Body styles as Stanford Cars names spell them (longest first, so "Cargo Van" wins over "Van").
BODIES = ("Crew Cab", "Extended Cab", "Regular Cab", "Club Cab", "Quad Cab", "Cargo Van", "Passenger Van", "Wagon Van",
          "SuperCab", "Convertible", "Hatchback", "Minivan", "Sedan", "Coupe", "Wagon", "SUV", "Van", "Cab")
MULTI_WORD_MAKES = ("AM General", "Aston Martin", "Land Rover")
_YEAR = re.compile(r"^(19|20)\d\d$")


class CarName(NamedTuple):
    """`<Make> <Model> <Body> <Year>` parsed from a class name; parts a name lacks are ''."""

    make: str
    model: str
    body: str
    year: str

    @property
    def without_year(self) -> str:
        return " ".join(p for p in (self.make, self.model, self.body) if p)


def parse_class_name(name: str) -> CarName:
    """Split a Stanford Cars class name, e.g. "Chevrolet Express Cargo Van 2007" -> (Chevrolet, Express, Cargo Van,
    2007). Makes of several words and models of several words ("Aston Martin V8 Vantage Coupe 2012") are handled;
    names without a body style ("Chevrolet Corvette ZR1 2012") keep everything in the model."""
    words = name.split()
    year = words.pop() if words and _YEAR.match(words[-1]) else ""
    make_words = next((len(m.split()) for m in MULTI_WORD_MAKES if words[:len(m.split())] == m.split()), 1)
    make, rest = " ".join(words[:make_words]), words[make_words:]
    body = ""
    for candidate in BODIES:
        n = len(candidate.split())
        if len(rest) > n and rest[-n:] == candidate.split():  # keep at least one word of model
            body, rest = candidate, rest[:-n]
            break
    return CarName(make, " ".join(rest), body, year)


RELATIONS = ("year_only", "body_only", "same_make_model", "same_model_line", "same_make", "other")


def relation(true_name: str, pred_name: str) -> str:
    """How two class names relate: year_only (all but the year equal), body_only (same make, model and year),
    same_make_model (body and year both differ), same_model_line (same make and first model word, another variant:
    "Silverado 1500" / "Silverado 1500 Classic", "Charger" / "Charger SRT-8"), same_make, or other."""
    a, b = parse_class_name(true_name), parse_class_name(pred_name)
    if a.make != b.make:
        return "other"
    if a.model != b.model:
        return "same_model_line" if a.model.split()[:1] == b.model.split()[:1] else "same_make"
    if a.without_year == b.without_year:
        return "year_only"
    if a.year == b.year:
        return "body_only"
    return "same_make_model"


def relation_matrix(class_names: list[str]) -> np.ndarray:
    """(C, C) array of RELATIONS indices for every ordered class pair (diagonal: 'other', unused)."""
    index = {r: i for i, r in enumerate(RELATIONS)}
    n = len(class_names)
    out = np.full((n, n), index["other"], dtype=np.int64)
    for i in range(n):
        for j in range(n):
            if i != j:
                out[i, j] = index[relation(class_names[i], class_names[j])]
    return out
