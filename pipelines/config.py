"""Pipeline configs: one YAML for the whole recipe of the paper's section 4.3, validated before any work.

Sections: model, data, teacher, binarize, pretrain, train, sensitivity, export, distributed, tracking.
Unknown sections, keys and quantizer names are refused with the valid ones listed (stages.config.build).
Each stage's config is a slice of this file; its key hashes that slice with its inputs' digests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cluster.local import resolve
from pcpp.quantizers import get_rule, rule_names
from pcpp.surgery import BinarizeSpec
from stages.config import (
    ConfigDocument,
    DistillConfig,
    DistributedConfig,
    ModelConfig,
    OptimConfig,
    apply_overrides,
    build,
    read_yaml,
)

TEACHER_SOURCES = ("file", "mlflow", "timm", "train")
STAGES = ("data", "teacher", "pretrain", "train", "sensitivity", "export")


@dataclass
class PipelineData:
    train: str = ""  # an ImageFolder tree, a tar (.tar / .tar.gz) of one, CIFAR batches, or a shard dir
    test: str = ""
    shard_size: int = 1000
    batch_size: int = 128
    num_workers: int = 0
    epoch_length: int | None = None
    eval_limit: int | None = None


@dataclass
class TeacherStage:
    source: str = "file"  # file | mlflow | timm | train
    path: str | None = None  # file: a checkpoint; timm: a weights file (None: the local HF cache)
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
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db


@dataclass
class PipelineConfig(ConfigDocument):
    name: str = "pipeline"
    root: str = "runs"  # run root: artifacts/, work/, mlflow.db, mlartifacts/
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
        for label, path in (("data.train", self.data.train), ("data.test", self.data.test)):
            if not path:
                raise ValueError(f"{label} is required (an image folder, a tar of one, or a shard directory)")
            if not resolve(path).exists():
                raise FileNotFoundError(f"{label}: {resolve(path)} does not exist")
        if self.teacher.source in ("file", "timm") and self.teacher.path and not resolve(self.teacher.path).exists():
            raise FileNotFoundError(f"teacher.path: checkpoint {resolve(self.teacher.path)} does not exist")
        ds = resolve(self.distributed.deepspeed)
        if not ds.exists():
            raise FileNotFoundError(f"distributed.deepspeed: {ds} does not exist")


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read and validate a pipeline YAML (overrides `section.key=value` applied first)."""
    data = apply_overrides(read_yaml(path), overrides or [])
    try:
        return build(PipelineConfig, data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
