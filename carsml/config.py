"""Experiment configuration: defaults from `carsml/experiments/defaults/<name>.yaml` (shipped in the package),
overrides from the CLI or `mlflow run -P`.

A YAML file may start with `inherit: <other>` to take another file's keys first (so shared defaults live once), and
`omit: a,b` to leave out inherited options that mean nothing for it.
A trailing `# comment` on a key's line is that option's help text in the CLI and the MLproject.
Configs are flat dicts of scalars (str, int, float, bool) so every key maps 1:1 onto an MLproject parameter.

A training entry point's `recipe` option names a file `carsml/experiments/defaults/recipes/<recipe>.yaml` whose values
replace the entry point's defaults (`study`, the default, is the entry point's own defaults, no file). An option set
explicitly wins over the recipe; keys the entry point does not have are ignored. `mlflow run` passes every
parameter, defaults included: there an option counts as set only where its value differs from the entry point's
default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from carsml.errors import ConfigError

DEFAULTS_DIR = Path(__file__).resolve().parent / "experiments" / "defaults"  # shipped inside the package
RECIPES_DIR = DEFAULTS_DIR / "recipes"
DEFAULT_RECIPE = "study"
_COMMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:.*?#\s*(.+)$")


@dataclass(frozen=True)
class Option:
    """One configurable option: its default value (whose type is the option's type) and help text."""

    name: str
    default: Any
    help: str = ""

    @property
    def type(self) -> type:
        return type(self.default)


def entry_points() -> list[str]:
    """Names of all experiments that have a defaults file (files starting with '_' are shared bases)."""
    return sorted(p.stem for p in DEFAULTS_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _defaults_file(name: str) -> Path:
    path = DEFAULTS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"Unknown experiment {name!r}: no defaults file {path}. Known: {', '.join(entry_points())}")
    return path


def options(name: str) -> dict[str, Option]:
    """All options of experiment `name` (inherited ones first), with defaults and help."""
    path = _defaults_file(name)
    raw = yaml.safe_load(path.read_text()) or {}
    helps = {}
    for line in path.read_text().splitlines():
        m = _COMMENT.match(line.strip())
        if m:
            helps[m.group(1)] = m.group(2).strip()
    parent = raw.pop("inherit", None)
    merged: dict[str, Option] = options(parent) if parent else {}
    for key in str(raw.pop("omit", "") or "").split(","):  # options of the parent this entry point does not have
        if key.strip() and merged.pop(key.strip(), None) is None:
            raise ConfigError(f"{path}: omit names {key.strip()!r}, which {parent!r} does not have")
    for key, value in raw.items():
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"{path}: option {key!r} must be a scalar (str/int/float/bool), got {value!r}")
        if key in merged and not helps.get(key):
            helps[key] = merged[key].help
        merged[key] = Option(key, value, helps.get(key, ""))
    return merged


def coerce(option: Option, value: Any) -> Any:
    """Convert `value` (often a string from the command line) to the option's type, or raise ConfigError."""
    kind = option.type
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    text = str(value).strip()
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            as_float = float(text)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        if kind is float:
            return float(text)
    except ValueError:
        raise ConfigError(
            f"Option {option.name!r}: expected {kind.__name__}, got {value!r}"
        ) from None
    return text


def recipes() -> list[str]:
    """Names of the training recipes (`study` plus one per file in carsml/experiments/defaults/recipes/)."""
    return [DEFAULT_RECIPE, *sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))]


def recipe_values(recipe: str) -> dict[str, Any]:
    """The option values of a named recipe ({} for `study`); ConfigError naming the known recipes otherwise."""
    if recipe == DEFAULT_RECIPE:
        return {}
    path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.is_file():
        raise ConfigError(f"recipe: expected one of {', '.join(recipes())}; got {recipe!r} (no file {path})")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    return values


def load_config(name: str, overrides: dict[str, Any] | None = None, *, passes_defaults: bool = False) -> dict[str, Any]:
    """Defaults of experiment `name` (with its `recipe` applied) and `overrides` on top (unknown keys raise ConfigError
    listing valid ones). `overrides` values of None are unset; with `passes_defaults` (the caller passes every option,
    as `mlflow run` does) a value equal to the default is unset too, so the recipe decides it."""
    opts = options(name)
    cfg = {key: opt.default for key, opt in opts.items()}
    explicit = set()
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in opts:
            raise ConfigError(f"Experiment {name!r} has no option {key!r}. Valid options: {', '.join(sorted(opts))}")
        cfg[key] = coerce(opts[key], value)
        if not passes_defaults or cfg[key] != opts[key].default:
            explicit.add(key)
    if "recipe" in opts:
        for key, value in recipe_values(cfg["recipe"]).items():
            if key in opts and key not in explicit:
                cfg[key] = coerce(opts[key], value)
    cfg["entry_point"] = name
    return cfg


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """Parse `key=value` strings (the CLI's `--set`)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"Expected key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = value
    return out
