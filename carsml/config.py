"""Experiment configuration: defaults from `carsml/experiments/defaults/<name>.yaml` (shipped in the package),
overrides from the CLI or `mlflow run -P`.

A YAML file may start with `inherit: <other>` to take another file's keys first (so shared defaults live once), and
`omit: a,b` to leave out inherited options that mean nothing for it.
A trailing `# comment` on a key's line is that option's help text in the CLI and the MLproject.
Values are scalars (str, int, float, bool) or `null` (unset), so every key maps 1:1 onto an MLproject parameter; each
option's type comes from its family in `carsml.options`, and `load_config` returns the typed, frozen `Options`.

A training entry point's `recipe` option names a file `carsml/experiments/defaults/recipes/<recipe>.yaml` whose values
replace the entry point's defaults (`study`, the default, is the entry point's own defaults, no file). An option set
explicitly wins over the recipe; keys the entry point does not have are ignored. `mlflow run` passes every
parameter, defaults included: there an option counts as set only where its value differs from the entry point's
default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from carsml.errors import ConfigError
from carsml.options import Options, OptionType, option_types
from carsml.options import coerce as coerce_value

DEFAULTS_DIR = Path(__file__).resolve().parent / "experiments" / "defaults"  # shipped inside the package
RECIPES_DIR = DEFAULTS_DIR / "recipes"
DEFAULT_RECIPE = "study"
_COMMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:.*?#\s*(.+)$")


@dataclass(frozen=True)
class Option:
    """One configurable option: its type (from its family in `carsml.options`), default value and help text."""

    name: str
    kind: OptionType
    default: Any
    help: str = ""

    @property
    def type(self) -> type:
        """The value's type when set (None is allowed too where `kind.optional`)."""
        return self.kind.base


def entry_points() -> list[str]:
    """Names of all experiments that have a defaults file (files starting with '_' are shared bases)."""
    return sorted(p.stem for p in DEFAULTS_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _defaults_file(name: str) -> Path:
    path = DEFAULTS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"Unknown experiment {name!r}: no defaults file {path}. Known: {', '.join(entry_points())}")
    return path


def options(name: str) -> dict[str, Option]:
    """All options of experiment `name` (inherited ones first), with types, defaults and help."""
    merged = _yaml_options(name)
    kinds = option_types(name)
    if set(kinds) != set(merged):
        raise ConfigError(f"{_defaults_file(name)}: options without a family field in carsml.options: "
                          f"{sorted(set(merged) - set(kinds)) or 'none'}; family fields without a default here: "
                          f"{sorted(set(kinds) - set(merged)) or 'none'}")
    return {k: Option(k, kinds[k], coerce_value(k, kinds[k], default), text) for k, (default, text) in merged.items()}


def _yaml_options(name: str) -> dict[str, tuple[Any, str]]:
    """Option name -> (default as written, help) of `name`'s defaults file, inherited ones first."""
    path = _defaults_file(name)
    raw = yaml.safe_load(path.read_text()) or {}
    helps = {}
    for line in path.read_text().splitlines():
        m = _COMMENT.match(line.strip())
        if m:
            helps[m.group(1)] = m.group(2).strip()
    parent = raw.pop("inherit", None)
    merged = _yaml_options(parent) if parent else {}
    for key in str(raw.pop("omit", "") or "").split(","):  # options of the parent this entry point does not have
        if key.strip() and merged.pop(key.strip(), None) is None:
            raise ConfigError(f"{path}: omit names {key.strip()!r}, which {parent!r} does not have")
    for key, value in raw.items():
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"{path}: option {key!r} must be a scalar (str/int/float/bool) or null, got {value!r}")
        merged[key] = (value, helps.get(key) or (merged[key][1] if key in merged else ""))
    return merged


def coerce(option: Option, value: Any) -> Any:
    """Convert `value` (often a string from the command line) to the option's type, or raise ConfigError."""
    return coerce_value(option.name, option.kind, value)


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


def load_config(name: str, overrides: Mapping[str, Any] | None = None, *, passes_defaults: bool = False) -> Options:
    """Defaults of experiment `name` (with its `recipe` applied) and `overrides` on top (unknown keys raise ConfigError
    listing valid ones), typed and checked into its option families. `overrides` values of None are not given; with
    `passes_defaults` (the caller passes every option, as `mlflow run` does) a value equal to the default is not given
    either, so the recipe decides it."""
    opts = options(name)
    cfg = {key: opt.default for key, opt in opts.items()}
    explicit = set()
    for key, value in (overrides or {}).items():
        if value is None or key == "entry_point":
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
    return Options.build(name, cfg)


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """Parse `key=value` strings (the CLI's `--set`)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"Expected key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = value
    return out
