"""Typed run configuration: dataclasses validated at load, YAML round trip, unknown keys refused.

`load_config(path, overrides=["optim.lr=0.01", ...])` reads a YAML file into a `TrainConfig`; every
section is a dataclass, so a misspelt key fails at once with the valid keys listed (torchtune's rule).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pcpp.quantizers import rule_names
from pcpp.surgery import BinarizeSpec

PIPELINES = ("ft", "e2e")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("cosine", "constant")


@dataclass
class ModelConfig:
    name: str = "resnet20"
    kwargs: dict = field(default_factory=dict)
    num_classes: int = 10


@dataclass
class DataConfig:
    train: str = ""  # shard directory (pcpp prepare)
    test: str = ""
    batch_size: int = 128  # global batch, split over workers
    num_workers: int = 0  # DataLoader workers per training worker
    epoch_length: int | None = None  # samples per epoch (all ranks); default: the train set size
    eval_limit: int | None = None  # evaluate on the first N test samples only


@dataclass
class AlgorithmConfig:
    rule: str = "pc++"  # pc++ | pq | rpc | ptb
    params: dict = field(default_factory=dict)  # the rule's schedules, e.g. {rho: {kind: linear, ...}}

    def __post_init__(self):
        if self.rule not in rule_names():
            raise ValueError(f"unknown algorithm.rule {self.rule!r}; valid: {', '.join(rule_names())}")


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    epochs: int = 1
    lr_schedule: str = "cosine"

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optim.name {self.name!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown optim.lr_schedule {self.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
        if self.epochs < 1:
            raise ValueError(f"optim.epochs must be >= 1, got {self.epochs}")


@dataclass
class DistillConfig:
    enabled: bool = False
    temperature: float = 4.0
    alpha: float = 1.0


@dataclass
class DistributedConfig:
    num_workers: int = 1
    use_gpu: bool = False
    deepspeed: str = "cluster/deepspeed/cpu.json"  # fp16 + ZeRO-2 on V100: cluster/deepspeed/v100.json
    zero_stage: int | None = None  # overrides the file's ZeRO stage when set


@dataclass
class TrackingConfig:
    experiment: str = "pcpp"
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite under run_root
    run_root: str = "runs"


class ConfigDocument:
    """Round trip of a top-level config dataclass: plain dict, YAML, and a short digest of its content."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainConfig(ConfigDocument):
    name: str = "run"
    seed: int = 0
    pipeline: str = "ft"  # ft: start from the teacher weights; e2e: random initialisation
    teacher: str | None = None  # full-precision checkpoint (FT initialisation, distillation teacher)
    init: str | None = None  # a binarized student's checkpoint to start from (after binarized pre-training)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    binarize: BinarizeSpec | None = field(default_factory=BinarizeSpec)  # None: full precision
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        if self.pipeline not in PIPELINES:
            raise ValueError(f"unknown pipeline {self.pipeline!r}; valid: {', '.join(PIPELINES)}")
        if self.pipeline == "ft" and not self.teacher:
            raise ValueError("pipeline 'ft' fine-tunes from a full-precision model: set teacher: PATH "
                             "(or use pipeline: e2e for random initialisation)")
        if self.distill.enabled and not self.teacher:
            raise ValueError("distill.enabled needs teacher: PATH (the full-precision teacher)")



def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def build(cls, data, where: str = ""):
    """Build dataclass `cls` from a dict, recursively; unknown keys raise with the valid ones listed."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown key {where + '.' if where else ''}{k}{hint}; valid keys: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        tp, optional = _strip_optional(hints[name])
        path = f"{where}.{name}" if where else name
        if _is_dataclass_type(tp):
            kwargs[name] = None if (value is None and optional) else build(tp, value, path)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where or cls.__name__}: {e}") from None


def _set_path(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        if d.get(k) is None:
            d[k] = {}
        d = d[k]
    d[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`key.sub=value` strings (values parsed as YAML) applied to a plain config dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. optim.lr=0.01)")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), yaml.safe_load(raw))
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    data = apply_overrides(read_yaml(path), overrides or [])
    try:
        return build(TrainConfig, data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
