"""Pretraining configuration: nested dataclasses, loaded from YAML, validated up front."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PretrainConfig", "ModelSection", "DataSection", "AugmentSection", "OptimSection",
           "RunSection", "load_config", "ConfigError", "CONFIG_DIR", "OFFSET_HANDLINGS"]

CONFIG_DIR = Path(__file__).parent / "configs"

OFFSET_HANDLINGS = ("raw", "harmonize")
"""``data.s2_offset``: keep the stored DN, or remove the baseline offset they carry
(:meth:`terrafm.sensors.Modality.harmonize`), as ``terrafm.stac.load(s2_offset=...)``."""


def _release_modalities() -> tuple[str, ...]:
    from terrafm.sensors import RELEASE_MODALITIES

    return RELEASE_MODALITIES


class ConfigError(ValueError):
    """A pretraining config that cannot work as written."""


@dataclass
class ModelSection:
    name: str = "terrafm_base"
    drop_path_rate: float = 0.1
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = True


@dataclass
class DataSection:
    kind: str = "majortom"               # "majortom" | "folder"
    root: str | None = None              # Major-TOM: dir with <modality>/ subdirs; folder: sample dirs
    modalities: list[str] = field(default_factory=lambda: list(_release_modalities()))
    cell_stats: str | None = None        # CSV/parquet: grid_cell, worldcover, climate, region, ocean_fraction
    tile_size: int = 534
    frequent_classes: list[int] | None = None   # None: the top `n_frequent` classes of cell_stats
    n_frequent: int = 3
    s2_offset: str = "raw"               # "raw" | "harmonize": the baseline DN offset (Modality.harmonize)
    ocean_keep: float = 0.02
    knn_root: str | None = None          # labelled held-out folder dataset for the kNN monitor
    num_workers: int = 8


@dataclass
class AugmentSection:
    global_size: int = 224
    local_size: int = 96
    n_local: int = 10
    global_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.25])
    modality_threshold: float = 0.5


@dataclass
class OptimSection:
    epochs: int = 150
    epoch_samples: int = 300_000
    batch_size: int = 1024               # global batch over all ranks
    base_lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 30
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    teacher_temp: float = 0.06
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 50
    student_temp: float = 0.1
    center_momentum: float = 0.9
    centering: str = "dual"              # "dual" (needs frequent land-cover classes) | "dino"
    alpha: float = 0.8                   # weight of c in dual centering
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 3


@dataclass
class RunSection:
    output_dir: str = "runs/terrafm"
    seed: int = 0
    amp: str = "bf16"                    # "bf16" | "fp16" | "none"
    checkpoint_every: int = 1000
    log_every: int = 10
    knn_every: int = 5000
    knn_k: int = 20
    tensorboard: bool = True


@dataclass
class PretrainConfig:
    """Everything a run needs. ``fingerprint`` covers what defines the run, not where it logs."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    @property
    def iters_per_epoch(self) -> int:
        return self.optim.epoch_samples // self.optim.batch_size

    @property
    def total_iters(self) -> int:
        return self.optim.epochs * self.iters_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        defining = self.to_dict()
        for volatile in ("output_dir", "checkpoint_every", "log_every", "knn_every", "tensorboard"):
            defining["run"].pop(volatile)
        defining["data"].pop("num_workers")
        return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self, world_size: int = 1) -> "PretrainConfig":
        """Raise :class:`ConfigError` listing every inconsistency (and how to fix it).

        Values of the wrong type (``epochs: ten``) are reported first; then impossible values
        (a learning rate, temperature, batch size or clip that is zero or negative, a momentum
        outside [0, 1], intervals below 1) and inconsistent combinations, all at once.

        Examples
        --------
        >>> load_config("tiny_cpu", ["optim.teacher_temp=0"]).validate()
        Traceback (most recent call last):
        ...
        pretrain.config.ConfigError: invalid pretraining config:
          - optim.teacher_temp=0 must be > 0 (a temperature divides the logits before the softmax; DINO uses 0.04-0.07 for the teacher and 0.1 for the student)
        """
        from terrafm.model import list_models
        from terrafm.sensors import MODALITIES, PATCH_SIZE

        from .loss import CENTERINGS

        a, o, d, m, r = self.augment, self.optim, self.data, self.model, self.run
        problems = _type_problems(self)
        if problems:    # the checks below compare numbers: wrong types first
            raise ConfigError("invalid pretraining config:\n  - " + "\n  - ".join(problems))
        problems = _range_problems(m, d, o, r)
        if m.name not in list_models():
            problems.append(f"model.name {m.name!r} is not registered; use one of {list_models()}")
        for name, size in (("global_size", a.global_size), ("local_size", a.local_size)):
            if size <= 0 or size % PATCH_SIZE:
                problems.append(f"augment.{name}={size} must be a positive multiple of {PATCH_SIZE}")
        if a.local_size > a.global_size:
            problems.append(f"augment.local_size={a.local_size} exceeds global_size={a.global_size}")
        if d.tile_size < a.local_size:
            problems.append(f"data.tile_size={d.tile_size} is smaller than augment.local_size="
                            f"{a.local_size}; crops are cut from tiles, so raise tile_size or lower the crop")
        for name, (lo, hi) in (("global_scale", a.global_scale), ("local_scale", a.local_scale)):
            if not 0 < lo <= hi <= 1:
                problems.append(f"augment.{name}={[lo, hi]} must satisfy 0 < low <= high <= 1")
        if a.n_local < 0:
            problems.append(f"augment.n_local={a.n_local} must be >= 0")
        if not 0 < a.modality_threshold <= 1:
            problems.append(f"augment.modality_threshold={a.modality_threshold} must lie in (0, 1]")
        unknown = [k for k in d.modalities if k not in MODALITIES]
        if unknown or not d.modalities:
            problems.append(f"data.modalities={d.modalities} must be a non-empty subset of {list(MODALITIES)}")
        elif d.kind == "majortom":
            unmapped = [k for k in d.modalities if MODALITIES[k].majortom is None]
            if unmapped:
                problems.append(f"data.modalities {unmapped} have no Major-TOM layout in the modality registry "
                                "(Modality.majortom); use data.kind=folder for them")
        if d.kind not in ("majortom", "folder"):
            problems.append(f"data.kind={d.kind!r} must be 'majortom' or 'folder'")
        if o.batch_size % world_size:
            problems.append(f"optim.batch_size={o.batch_size} (global) is not divisible by the "
                            f"{world_size} ranks; pick a multiple of {world_size}")
        if o.epoch_samples < o.batch_size:
            problems.append(f"optim.epoch_samples={o.epoch_samples} is smaller than one batch ({o.batch_size})")
        if not 0 <= o.warmup_epochs <= o.epochs:
            problems.append(f"optim.warmup_epochs={o.warmup_epochs} must lie in [0, epochs={o.epochs}]")
        if o.freeze_last_layer_epochs > o.epochs:
            problems.append(f"optim.freeze_last_layer_epochs={o.freeze_last_layer_epochs} > epochs={o.epochs}")
        if not 0 <= o.alpha <= 1:
            problems.append(f"optim.alpha={o.alpha} must lie in [0, 1]")
        if o.centering not in CENTERINGS:
            problems.append(f"optim.centering={o.centering!r} must be one of {list(CENTERINGS)}")
        elif o.centering == "dual" and d.frequent_classes is not None and not d.frequent_classes:
            problems.append("optim.centering='dual' with data.frequent_classes=[]: dual centering needs "
                            "frequent land-cover classes; list them, set data.frequent_classes=null to take "
                            "the data.n_frequent most common ones of data.cell_stats, or use optim.centering=dino")
        elif o.centering == "dino" and d.frequent_classes:
            problems.append(f"data.frequent_classes={d.frequent_classes} is set but optim.centering='dino' "
                            "does not use them; drop the classes or use optim.centering=dual")
        if o.centering == "dual" and d.n_frequent < 1 and d.frequent_classes is None:
            problems.append(f"data.n_frequent={d.n_frequent} must be >= 1 for optim.centering='dual'")
        if d.s2_offset not in OFFSET_HANDLINGS:
            problems.append(f"data.s2_offset={d.s2_offset!r} must be one of {list(OFFSET_HANDLINGS)}")
        elif d.s2_offset == "harmonize" and d.kind == "folder":
            problems.append("data.s2_offset='harmonize' needs each product's processing baseline or date, which "
                            "a GeoTIFF folder does not record; harmonize the files when writing them and keep "
                            "data.s2_offset='raw'")
        if r.amp not in ("bf16", "fp16", "none"):
            problems.append(f"run.amp={r.amp!r} must be 'bf16', 'fp16' or 'none'")
        if m.out_dim < 2 or m.bottleneck_dim < 1 or m.hidden_dim < 1:
            problems.append("model.out_dim, hidden_dim and bottleneck_dim must be positive (out_dim >= 2)")
        if problems:
            raise ConfigError("invalid pretraining config:\n  - " + "\n  - ".join(problems))
        return self


def _type_problems(cfg: PretrainConfig) -> list[str]:
    """Every field whose value is not of its declared type (e.g. ``epochs: ten``, ``base_lr: fast``)."""
    problems = []
    for section in _SECTIONS:
        values = getattr(cfg, section)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            rule = _type_rule(value, f.type)
            if rule:
                problems.append(f"{section}.{f.name}={value!r} must be {rule}")
    return problems


def _type_rule(value: Any, annotation: str) -> str | None:
    """None if ``value`` fits the (string) annotation, else what it must be."""
    options = [a.strip() for a in annotation.split("|")]
    if value is None:
        return None if "None" in options else "set (not null)"
    kind = next(a for a in options if a != "None")
    if kind.startswith("list["):
        inner = kind[5:-1]
        if not isinstance(value, list):
            return f"a list of {inner} values, e.g. [...]"
        bad = [v for v in value if _type_rule(v, inner)]
        return f"a list of {inner} values (not {bad})" if bad else None
    is_bool = isinstance(value, bool)
    if kind == "bool":
        return None if is_bool else "true or false"
    if kind == "int":
        return None if isinstance(value, numbers.Integral) and not is_bool else "an integer"
    if kind == "float":
        return None if isinstance(value, numbers.Real) and not is_bool else "a number"
    if kind == "str":
        return None if isinstance(value, str) else "a string"
    return None


def _range_problems(m: ModelSection, d: DataSection, o: OptimSection, r: RunSection) -> list[str]:
    """Values no run can use: zero or negative rates, temperatures, counts and intervals."""
    problems = []

    def at_least(name: str, value, low, why: str = "") -> None:
        if value < low:
            problems.append(f"{name}={value} must be >= {low}" + (f" ({why})" if why else ""))

    def positive(name: str, value, why: str) -> None:
        if not value > 0:
            problems.append(f"{name}={value} must be > 0 ({why})")

    def within(name: str, value, low, high, closed_high: bool = True, why: str = "") -> None:
        if not (low <= value <= high if closed_high else low <= value < high):
            problems.append(f"{name}={value} must lie in [{low}, {high}{']' if closed_high else ')'}"
                            + (f" ({why})" if why else ""))

    positive("optim.base_lr", o.base_lr, "the peak learning rate is base_lr * batch_size / 256; DINO uses 5e-4, "
             "the paper 1e-4")
    at_least("optim.min_lr", o.min_lr, 0, "the learning rate at the end of the cosine")
    for name in ("teacher_temp", "warmup_teacher_temp", "student_temp"):
        positive(f"optim.{name}", getattr(o, name), "a temperature divides the logits before the softmax; "
                 "DINO uses 0.04-0.07 for the teacher and 0.1 for the student")
    within("optim.momentum_teacher", o.momentum_teacher, 0, 1, why="EMA momentum; DINO uses 0.996")
    within("optim.center_momentum", o.center_momentum, 0, 1, why="EMA momentum of the center; DINO uses 0.9")
    at_least("optim.weight_decay", o.weight_decay, 0)
    at_least("optim.weight_decay_end", o.weight_decay_end, 0)
    at_least("optim.epochs", o.epochs, 1)
    at_least("optim.epoch_samples", o.epoch_samples, 1)
    at_least("optim.batch_size", o.batch_size, 1, "the global batch over all ranks")
    positive("optim.clip_grad", o.clip_grad, "each parameter's gradient norm is clipped to it, so 0 would zero "
             "every gradient; DINO uses 3.0, a large value clips nothing")
    if not 0 <= o.warmup_teacher_temp_epochs <= o.epochs:
        problems.append(f"optim.warmup_teacher_temp_epochs={o.warmup_teacher_temp_epochs} must lie in "
                        f"[0, epochs={o.epochs}]")
    at_least("optim.freeze_last_layer_epochs", o.freeze_last_layer_epochs, 0)
    within("model.drop_path_rate", m.drop_path_rate, 0, 1, closed_high=False)
    at_least("model.head_layers", m.head_layers, 1)
    at_least("data.num_workers", d.num_workers, 0)
    within("data.ocean_keep", d.ocean_keep, 0, 1, why="the fraction of ocean tiles kept")
    at_least("run.checkpoint_every", r.checkpoint_every, 1, "iterations between checkpoints")
    at_least("run.log_every", r.log_every, 1, "iterations between metric rows")
    at_least("run.knn_every", r.knn_every, 0, "0 turns the kNN monitor off")
    at_least("run.knn_k", r.knn_k, 1)
    at_least("run.seed", r.seed, 0, "numpy seeds are non-negative")
    return problems


def _coerce_numbers(cls, values: dict) -> dict:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: a float field takes the number it spells."""
    kinds = {f.name: f.type for f in dataclasses.fields(cls)}
    out = dict(values)
    for name, value in values.items():
        if isinstance(value, str) and kinds.get(name, "").split("|")[0].strip() == "float":
            try:
                out[name] = float(value)
            except ValueError:
                pass          # left as text: validate() names the field and the type
    return out


_SECTIONS = {"model": ModelSection, "data": DataSection, "augment": AugmentSection,
             "optim": OptimSection, "run": RunSection}


def _parse_value(text: str) -> Any:
    import yaml
    return yaml.safe_load(text)


def load_config(path: str | Path, overrides: list[str] | None = None) -> PretrainConfig:
    """Read a YAML config (a name like ``tiny_cpu`` means ``pretrain/configs/tiny_cpu.yaml``).

    ``overrides`` are ``section.field=value`` strings (YAML values), e.g. ``data.root=/data``.

    Examples
    --------
    >>> cfg = load_config("tiny_cpu", ["optim.epochs=2"])
    >>> cfg.model.name, cfg.optim.epochs
    ('terrafm_tiny', 2)
    """
    import yaml

    path = Path(path)
    if not path.exists() and (CONFIG_DIR / f"{path.name}.yaml").exists():
        path = CONFIG_DIR / f"{path.name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"config {str(path)!r} not found; pass a YAML file or one of "
                                f"{sorted(p.stem for p in CONFIG_DIR.glob('*.yaml'))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"{path} is not valid YAML{line}: {getattr(exc, 'problem', None) or exc}; fix the "
                          "file (sections are mappings, e.g. 'optim: {epochs: 10}')") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} holds a {type(raw).__name__}, not a mapping of sections; write it as "
                          f"'section: {{key: value}}' with sections {list(_SECTIONS)}")
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.field=value, e.g. data.root=/data")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        if raw.get(section) is None:
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise ConfigError(f"section {section!r} of {path} is {raw[section]!r}, not a mapping; write it as "
                              f"'{section}: {{key: value}}'")
        try:
            raw[section][name] = _parse_value(value)
        except Exception as exc:    # yaml.YAMLError
            raise ConfigError(f"override {item!r}: {value!r} is not a YAML value ({getattr(exc, 'problem', exc)}); "
                              "quote text, e.g. data.root='/data/a b'") from None
    sections = {}
    for section, values in raw.items():
        if section not in _SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {path}; known: {list(_SECTIONS)}")
        cls = _SECTIONS[section]
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"section {section!r} of {path} is {values!r}, not a mapping; write it as "
                              f"'{section}: {{key: value}}'")
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(values or {}) - known)
        if bad:
            raise ConfigError(f"unknown keys {bad} in section {section!r} of {path}; known: {sorted(known)}")
        sections[section] = cls(**_coerce_numbers(cls, values or {}))
    return PretrainConfig(**sections)
