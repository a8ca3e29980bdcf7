"""Typed options: one frozen dataclass per family of options, and `Options`, an entry point's resolved options.

The YAML files in `carsml/experiments/defaults/` are the only copy of each default; the dataclasses here give each
option its type (and, for `Literal` types, its allowed values). `None` means "unset" (the source run's value, the
model's default, no limit): it is `null` in the YAML and the empty string on the command line and in MLflow params.
`carsml.config.load_config` builds an entry point's families once from YAML + CLI / `mlflow run -P` values, coercing
and checking every value, so code after it never sees an option of the wrong type or an unknown choice.

`Options` is read both ways: by family (`opts.train.epochs`, `opts.data.image_size`) and as the read-only flat
mapping of option name to value that MLflow logs as params (`opts["epochs"]`, `dict(opts)`). `opts.replace(**changes)`
is a new, re-checked `Options`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from carsml.errors import ConfigError

Amp = Literal["auto", "off", "bf16", "fp16"]
Split = Literal["test", "val"]


@dataclass(frozen=True)
class DataOptions:
    """Which images and how they are read (`_data.yaml`)."""

    data: str
    synth_classes: int
    synth_images_per_class: int
    synth_seed: int
    cache_dir: str | None  # None: $CARSML_CACHE or ~/.cache/carsml
    image_size: int
    use_boxes: bool
    crop_margin: float
    skip_unreadable: bool
    seed: int


@dataclass(frozen=True)
class SourceOptions:
    """The trained model an analysis reads, and its data options, each None = the source run's (`_source.yaml`)."""

    run_id: str | None  # None: the experiment's best finished training run
    data: str | None
    synth_classes: int | None
    synth_images_per_class: int | None
    synth_seed: int | None
    cache_dir: str | None
    image_size: int | None
    use_boxes: bool | None
    crop_margin: float | None
    skip_unreadable: bool | None


@dataclass(frozen=True)
class TrackingOptions:
    """Where the run goes in MLflow."""

    experiment_name: str


@dataclass(frozen=True)
class ModelOptions:
    """The network built (`_train.yaml`)."""

    model: str
    dropout: float | None  # None: the model's default
    drop_path_rate: float
    head_widths: str
    head: Literal["flatten", "gap"]
    se: bool
    late_residual: bool


@dataclass(frozen=True)
class TrainOptions:
    """How the network is trained (`_train.yaml`); `carsml.experiments.train.train_config` makes the engine's
    `TrainConfig` from it."""

    recipe: str
    val_fraction: float
    epochs: int
    batch_size: int
    lr: float
    optimizer: Literal["adam", "adamw", "sgd"]
    weight_decay: float
    decay_norm_bias: bool
    scheduler: Literal["none", "plateau", "cosine"]
    plateau_patience: int
    plateau_factor: float
    warmup_epochs: int
    augmentation: str  # a transform policy name (checked by the transform registry)
    cache_scale: float
    mixup: float
    cutmix: float
    label_smoothing: float
    ema_decay: float
    grad_clip: float
    early_stopping_patience: int
    select_on: Literal["val_acc", "val_loss"]
    amp: Amp
    channels_last: bool
    device: str
    max_classes: int | None  # None: every class


@dataclass(frozen=True)
class RunOptions:
    """A training run's life: resuming, checkpoints, the logged model."""

    resume_run_id: str | None
    keep_checkpoints: bool
    log_model: bool
    system_metrics: bool


@dataclass(frozen=True)
class RefitOptions:
    """Refit on train + val for the epochs a finished selection run chose."""

    refit_run_id: str | None


@dataclass(frozen=True)
class ProcessOptions:
    """How many processes train each model (DistributedDataParallel under torchrun): the run's, each fold's, each
    trial's."""

    nproc: int


@dataclass(frozen=True)
class KFoldOptions:
    """k-fold cross-validation."""

    folds: int
    folds_parallel: int


@dataclass(frozen=True)
class InitOptions:
    """Where a timm model's initial weights come from."""

    pretrained: bool
    weights: str | None  # a local weights file (a folder of them for transfer_all)


@dataclass(frozen=True)
class TransferOptions:
    """Fine-tuning: the new head's learning rate and a frozen backbone's first epochs."""

    head_lr: float | None  # None: the same as lr
    freeze_backbone_epochs: int


@dataclass(frozen=True)
class TransferAllOptions:
    """The study's transfer table: one model per name."""

    models: str


@dataclass(frozen=True)
class TuneOptions:
    """The Optuna search (`tune.yaml`)."""

    n_trials: int
    timeout: float | None  # None: no limit
    lr_min: float
    lr_max: float
    dropout_min: float
    dropout_max: float
    weight_decay_min: float
    weight_decay_max: float
    sampler: Literal["tpe", "random"]
    sampler_seed: int | None  # None: seed + trials already in the study
    sampler_startup_trials: int
    pruner: Literal["median", "hyperband", "none"]
    pruner_startup_trials: int
    pruner_warmup_epochs: int
    storage: str
    study_name: str
    load_if_exists: bool
    heartbeat_interval: int | None  # None: no heartbeat
    max_retry: int


@dataclass(frozen=True)
class DataAnalysisOptions:
    """`data_analysis`."""

    sample_images: int
    image_stats_limit: int


@dataclass(frozen=True)
class ErrorsOptions:
    """`errors`: the misclassification analysis."""

    seed: int
    split: Split
    top_pairs: int
    gallery: int
    worst_classes: int
    zoom_classes: int
    calibration_bins: int
    batch_size: int
    device: str
    amp: Amp


@dataclass(frozen=True)
class TtaOptions:
    """`tta`: test-time augmentation."""

    seed: int
    split: Split
    views: int
    policy: Literal["light", "study"]
    aggregation: Literal["mean", "vote"]
    batch_size: int
    device: str
    amp: Amp


@dataclass(frozen=True)
class NewCategoryOptions:
    """`new_category`: each None = the source run's value (warmstart: its own rule, see new_category.yaml)."""

    seed: int | None
    folder: str | None
    class_name: str
    test_fraction: float
    mode: Literal["scratch", "warmstart"]
    init: Literal["imprint", "mean"]
    epochs: int | None
    lr: float | None
    head_lr: float | None
    batch_size: int | None
    device: str


@dataclass(frozen=True)
class FeaturesRfOptions:
    """`features_rf`: classic heads on a trained network's features."""

    run_id: str | None  # None: the best finished transfer run of `model`
    model: str
    data: str | None  # None: the source run's
    cache_dir: str | None
    n_estimators: int
    max_depth: int | None  # None: unlimited
    random_state: int
    n_jobs: int
    logreg_c: float
    logreg_max_iter: int
    knn_k: int
    batch_size: int
    device: str
    amp: Amp


@dataclass(frozen=True)
class PromoteOptions:
    """`promote`: the registry."""

    model: str
    model_name: str | None
    rf_model_name: str | None
    force: bool


@dataclass(frozen=True)
class ReportOptions:
    """`report`."""

    out: str
    log: bool


@dataclass(frozen=True)
class StudyOptions:
    """`study`: the whole study in one parent run."""

    data: str
    cache_dir: str | None
    device: str
    profile: str
    steps: str | None  # None: every step
    set: str
    report_dir: str


_TRAIN = {"data": DataOptions, "tracking": TrackingOptions, "model": ModelOptions, "train": TrainOptions,
          "run": RunOptions}
_SOURCE = {"source": SourceOptions, "tracking": TrackingOptions}
FAMILIES: dict[str, dict[str, type]] = {
    "_data": {"data": DataOptions, "tracking": TrackingOptions},
    "_source": _SOURCE,
    "_train": _TRAIN,
    "baseline": {**_TRAIN, "refit": RefitOptions, "process": ProcessOptions},
    "improved": {**_TRAIN, "refit": RefitOptions, "process": ProcessOptions},
    "kfold_baseline": {**_TRAIN, "kfold": KFoldOptions, "process": ProcessOptions},
    "kfold_improved": {**_TRAIN, "kfold": KFoldOptions, "process": ProcessOptions},
    "transfer": {**_TRAIN, "init": InitOptions, "transfer": TransferOptions, "refit": RefitOptions,
                 "process": ProcessOptions},
    "transfer_all": {**_TRAIN, "init": InitOptions, "transfer": TransferOptions, "transfer_all": TransferAllOptions},
    "tune": {**_TRAIN, "init": InitOptions, "tune": TuneOptions, "process": ProcessOptions},
    "data_analysis": {"data": DataOptions, "tracking": TrackingOptions, "data_analysis": DataAnalysisOptions},
    "errors": {**_SOURCE, "errors": ErrorsOptions},
    "tta": {**_SOURCE, "tta": TtaOptions},
    "new_category": {**_SOURCE, "new_category": NewCategoryOptions},
    "features_rf": {"tracking": TrackingOptions, "features_rf": FeaturesRfOptions},
    "promote": {"tracking": TrackingOptions, "promote": PromoteOptions},
    "report": {"tracking": TrackingOptions, "report": ReportOptions},
    "study": {"tracking": TrackingOptions, "study": StudyOptions},
}


@dataclass(frozen=True)
class OptionType:
    """An option's type as declared by its family: the base type, whether None is allowed, the allowed values."""

    base: type
    optional: bool = False
    choices: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        text = " | ".join(self.choices) if self.choices else self.base.__name__
        return f"{text} or empty (unset)" if self.optional else text


def _option_type(hint: Any) -> OptionType:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return dataclasses.replace(_option_type(inner[0]), optional=True)
    if typing.get_origin(hint) is Literal:
        return OptionType(str, choices=tuple(args))
    return OptionType(hint)


def option_types(entry: str) -> dict[str, OptionType]:
    """Every option of `entry` (an entry point or a shared base such as `_train`) with the type its family declares."""
    if entry not in FAMILIES:
        raise ConfigError(f"No option families for {entry!r}: add it to carsml.options.FAMILIES")
    out: dict[str, OptionType] = {}
    for family in FAMILIES[entry].values():
        for name, hint in typing.get_type_hints(family).items():
            out[name] = _option_type(hint)
    return out


def coerce(name: str, kind: OptionType, value: Any) -> Any:
    """`value` (often a string from the command line or an MLflow param) as `kind`, or ConfigError."""
    if value is None or (kind.optional and isinstance(value, str) and value.strip() in ("", "''", "None")):
        if kind.optional:
            return None
        raise ConfigError(f"Option {name!r}: expected {kind.name}; got nothing (it has no unset value)")
    base = kind.base
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        out = value
    elif base is float and isinstance(value, int) and not isinstance(value, bool):
        out = float(value)
    else:
        out = _parse(name, kind, str(value).strip())
    if kind.choices and out not in kind.choices:
        raise ConfigError(f"Option {name!r}: expected one of {', '.join(kind.choices)}; got {value!r}")
    return out


def _parse(name: str, kind: OptionType, text: str) -> Any:
    try:
        if kind.base is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind.base is int:
            as_float = float(text)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        if kind.base is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"Option {name!r}: expected {kind.name}; got {text!r}") from None
    return text



@dataclass(frozen=True)
class Options(Mapping[str, Any]):
    """An entry point's resolved options: its families (`opts.train`, `opts.data`, ...) and, as a read-only mapping,
    every option by name plus `entry_point` (what MLflow logs as params)."""

    entry_point: str
    families: Mapping[str, Any]
    values: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        flat = {k: v for family in self.families.values() for k, v in dataclasses.asdict(family).items()}
        object.__setattr__(self, "values", types.MappingProxyType({**flat, "entry_point": self.entry_point}))

    @classmethod
    def build(cls, entry: str, values: Mapping[str, Any]) -> Options:
        """Coerce and check `values` (every option of `entry`, by name) into its families."""
        kinds = option_types(entry)
        missing = sorted(set(kinds) - set(values))
        unknown = sorted(set(values) - set(kinds) - {"entry_point"})
        if missing or unknown:
            raise ConfigError(f"Options of {entry!r}: missing {missing or 'none'}, unknown {unknown or 'none'}")
        families = {}
        for name, family in FAMILIES[entry].items():
            fields = [f.name for f in dataclasses.fields(family)]
            families[name] = family(**{f: coerce(f, kinds[f], values[f]) for f in fields})
        return cls(entry, families)

    def __getattr__(self, name: str) -> Any:
        families = self.__dict__.get("families", {})
        if name in families:
            return families[name]
        raise AttributeError(f"{self.__dict__.get('entry_point')!r} has no option family {name!r}; it has "
                             f"{', '.join(families)}")

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def replace(self, **changes: Any) -> Options:
        """These options with `changes` (by option name), checked again."""
        return Options.build(self.entry_point, {**self.values, **changes})
