"""Pipeline configs: one YAML for the whole recipe of the paper's section 4.3, validated before any work.

Sections: model, data, teacher, binarize, pretrain, train, sensitivity, export, distributed, tracking.
Unknown sections, keys and quantizer names are refused with the valid ones listed (stages.config.build).
Each stage's config is a slice of this file; its key hashes that slice with its inputs' digests.
Values are typed at load (stages.schema); relative paths are taken from the directory the command runs
in and made absolute at load, so every stage and worker receives absolute paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cluster.local import deepspeed_file
from pcpp.quantizers import get_rule, rule_names
from pcpp.surgery import BinarizeSpec
from stages.config import (
    PATH,
    URI,
    ConfigDocument,
    ConfigError,
    DistillConfig,
    DistributedConfig,
    ModelConfig,
    OptimConfig,
    absolute,
    apply_overrides,
    build,
    read_yaml,
)

TEACHER_SOURCES = ("file", "mlflow", "timm", "train")
STAGES = ("data", "teacher", "pretrain", "train", "sensitivity", "export")


@dataclass
class PipelineData:
    train: str = field(default="", metadata=PATH)  # an ImageFolder tree, a tar of one, CIFAR batches, shards
    test: str = field(default="", metadata=PATH)
    shard_size: int = 1000
    batch_size: int = 128
    num_workers: int = 0
    epoch_length: int | None = None
    eval_limit: int | None = None


@dataclass
class TeacherStage:
    source: str = "file"  # file | mlflow | timm | train
    path: str | None = field(default=None, metadata=PATH)  # file: a checkpoint; timm: a weights file (or the HF cache)
    uri: str | None = None  # mlflow: a model URI (runs:/<id>/model, models:/<name>/<version>)
    epochs: int = 1  # train: epochs of full-precision training
    lr: float = 1e-3

    def __post_init__(self):
        if self.source not in TEACHER_SOURCES:
            raise ValueError(f"unknown teacher.source {self.source!r}; valid: {', '.join(TEACHER_SOURCES)}")
        if self.source == "file" and not self.path:
            raise ValueError("teacher.source 'file' needs teacher.path")
        if self.source == "mlflow" and not self.uri:
            raise ValueError("teacher.source 'mlflow' needs teacher.uri (e.g. runs:/<run id>/model)")


@dataclass
class PretrainStage:
    """Binarized pre-training from the teacher for a few epochs (section 4.3, protocol 3)."""

    enabled: bool = False
    epochs: int = 1
    lr: float = 1e-3


@dataclass
class TrainStage:
    pipeline: str = "ft"  # ft: from the teacher (or the pre-trained binarized model); e2e: random init
    rule: str = "pc++"
    rule_params: dict = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    seed: int = 0

    def __post_init__(self):
        if self.pipeline not in ("ft", "e2e"):
            raise ValueError(f"unknown train.pipeline {self.pipeline!r}; valid: ft, e2e")
        if self.rule not in rule_names():
            raise ValueError(f"unknown train.rule {self.rule!r}; valid: {', '.join(rule_names())}")
        get_rule(self.rule, **self.rule_params)  # validates the rule's parameters


@dataclass
class SensitivityStage:
    enabled: bool = True
    weight: str = "bnn++"
    activation: str | None = None
    scaling: str = "layer"
    eval_limit: int | None = None
    bat_steps: int = 0
    bat_lr: float = 1e-4
    batch_size: int = 256


@dataclass
class ExportStage:
    enabled: bool = True


@dataclass
class PipelineTracking:
    experiment: str = "pcpp"
    tracking_uri: str | None = field(default=None, metadata=URI)  # default: MLFLOW_TRACKING_URI, else <root>/mlflow.db


@dataclass
class PipelineConfig(ConfigDocument):
    name: str = "pipeline"
    root: str = field(default="runs", metadata=PATH)  # run root: artifacts/, work/, mlflow.db, mlartifacts/
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PipelineData = field(default_factory=PipelineData)
    teacher: TeacherStage = field(default_factory=TeacherStage)
    binarize: BinarizeSpec = field(default_factory=BinarizeSpec)
    pretrain: PretrainStage = field(default_factory=PretrainStage)
    train: TrainStage = field(default_factory=TrainStage)
    sensitivity: SensitivityStage = field(default_factory=SensitivityStage)
    export: ExportStage = field(default_factory=ExportStage)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: PipelineTracking = field(default_factory=PipelineTracking)

    def __post_init__(self):
        BinarizeSpec(weight=self.sensitivity.weight, activation=self.sensitivity.activation,
                     scaling=self.sensitivity.scaling)  # validates the scan's quantizer names

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser().resolve()

    def check_files(self) -> None:
        """Every input file named by the config exists: fail before any stage starts."""
        missing = []
        for label, path in (("data.train", self.data.train), ("data.test", self.data.test)):
            if not path:
                raise ValueError(f"{label} is required (an image folder, a tar of one, or a shard directory)")
            if not os.path.exists(path):
                missing.append(f"{label}: {path} does not exist")
        if self.teacher.source in ("file", "timm") and self.teacher.path and not os.path.exists(self.teacher.path):
            missing.append(f"teacher.path: checkpoint {self.teacher.path} does not exist")
        if not deepspeed_file(self.distributed.deepspeed).exists():
            missing.append(f"distributed.deepspeed: {deepspeed_file(self.distributed.deepspeed)} does not exist")
        if missing:
            raise FileNotFoundError("; ".join(missing) + " (relative paths are taken from the directory pcpp runs in)")


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, type and validate a pipeline YAML (overrides `section.key=value` applied first); relative paths
    become absolute, taken from the working directory."""
    data = apply_overrides(read_yaml(path), overrides or [])
    try:
        return absolute(build(PipelineConfig, data))
    except ConfigError as e:
        raise ConfigError([f"{path}: {e}"]) from None
