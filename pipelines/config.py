"""Pipeline configs: one YAML for the whole of the paper's section 4.3, validated before any work.

Sections: model, data, teacher, binarize, pretrain, train, sensitivity, export, frontier, distributed,
tracking.
Unknown sections, keys and quantizer names are refused with the valid ones listed (stages.schema.build).
Values are typed at load; relative paths are taken from the directory the command runs in and made
absolute at load, so every stage and worker receives absolute paths.

The pipeline config is composed of the stages' configs (stages.registry): `stage_configs()` gives each
stage its own typed config, built from its section and the shared sections it reads (model, the data
loader settings, binarize, distributed); a stage never sees anything else, and its key hashes exactly
that. The training stages receive a `TrainConfig`, the schema `pcpp train` reads: the `train` section
holds its own parts (seed, init, algorithm, optim, distill) under the same names.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from cluster.local import deepspeed_file
from pcpp.surgery import BinarizeSpec, is_keep_fp_policy
from stages.config import (
    INIT_OF_PIPELINE,
    PATH,
    URI,
    AlgorithmConfig,
    ConfigDocument,
    ConfigError,
    DataConfig,
    DistillConfig,
    DistributedConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    absolute,
    apply_overrides,
    build,
    check_init,
    read_yaml,
)
from stages.data.stage import DataStageConfig
from stages.export import ExportConfig
from stages.frontier import FrontierConfig
from stages.schema import located, renamed
from stages.sensitivity import SensitivityConfig
from stages.teacher import SOURCES as TEACHER_SOURCES
from stages.teacher import TeacherConfig

STAGES = ("data", "teacher", "pretrain", "train", "sensitivity", "export", "frontier")


@dataclass
class PipelineData(DataConfig):
    """data: the image sources (an ImageFolder tree, a tar of one, CIFAR batches, or a shard directory),
    which the data stage shards, and the loader settings every training and evaluation stage uses."""

    shard_size: int = 1000

    def loader(self) -> DataConfig:
        """The loader settings, as the training stages receive them (their shard directories come from the
        data stage's artifact when they run)."""
        return DataConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DataConfig)
                             if f.name not in ("train", "test")})


@dataclass
class TeacherSection:
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
class PretrainSection:
    """Binarized pre-training from the teacher for a few epochs (section 4.3, protocol 3)."""

    enabled: bool = False
    epochs: int = 1
    lr: float = 1e-3


@dataclass
class TrainSection:
    """The train stage's own part of its TrainConfig (same keys); model, data loader, binarize and
    distributed come from the pipeline's shared sections."""

    seed: int = 0
    init: str = "teacher"  # teacher: FT (from the pre-trained binarized model when pretrain runs); random: E2E
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self):
        from pcpp.rules import get_rule

        check_init(self.init)
        get_rule(self.algorithm.rule, **self.algorithm.params)  # validates the rule's parameters

    @classmethod
    def upgrade(cls, data: dict, where: str) -> dict:
        """Keys of earlier releases: train.pipeline (ft | e2e), now train.init (teacher | random), and
        train.rule / train.rule_params, now train.algorithm.rule / .params."""
        data = renamed(data, where, "pipeline", "init", INIT_OF_PIPELINE)
        data = renamed(data, where, "rule", "algorithm.rule")
        return renamed(data, where, "rule_params", "algorithm.params")


@dataclass
class SensitivitySection(SensitivityConfig):
    enabled: bool = True


@dataclass
class ExportSection:
    """export: whether the stage runs, and the precision of the kept full-precision tensors (fp32, the
    default and bit-exact, fp16 or bf16: pcpp.export.PRECISIONS)."""

    enabled: bool = True
    precision: str = "fp32"

    def __post_init__(self):
        from pcpp.export import check_precision

        check_precision(self.precision, "export.precision")


@dataclass
class FrontierSection:
    """frontier: the accuracy-versus-size frontier of mixed binarization (stages.frontier), off by default:
    the train section's recipe trained and exported for K = 0 (always), each K of `keep` (the K most sensitive
    blocks of the sensitivity scan kept in full precision) and each budget (bytes of the exported file, or
    times smaller than fp32), ranked `by` drop_ptb or drop_bat."""

    enabled: bool = False
    keep: list[int] = field(default_factory=lambda: [0, 1, 2])
    budget_bytes: list[int] = field(default_factory=list)
    budget_ratio: list[float] = field(default_factory=list)
    by: str | None = None

    def __post_init__(self):  # the points and `by`, checked at load
        FrontierConfig(keep=self.keep, budget_bytes=self.budget_bytes, budget_ratio=self.budget_ratio, by=self.by)


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
    teacher: TeacherSection = field(default_factory=TeacherSection)
    binarize: BinarizeSpec = field(default_factory=BinarizeSpec)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    train: TrainSection = field(default_factory=TrainSection)
    sensitivity: SensitivitySection = field(default_factory=SensitivitySection)
    export: ExportSection = field(default_factory=ExportSection)
    frontier: FrontierSection = field(default_factory=FrontierSection)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: PipelineTracking = field(default_factory=PipelineTracking)

    def __post_init__(self):
        """What reads the sensitivity scan needs it: a keep_fp policy, the frontier (refused with what to set)."""
        keep_fp, frontier = self.binarize.keep_fp, self.frontier
        readers = ([f"binarize.keep_fp {keep_fp}"] if is_keep_fp_policy(keep_fp) else []) + (
            ["frontier.enabled"] if frontier.enabled else [])
        if readers and not self.sensitivity.enabled:
            instead = "" if frontier.enabled else " (or give binarize.keep_fp as module-name patterns)"
            raise ValueError(f"{' and '.join(readers)} {'need' if len(readers) > 1 else 'needs'} the sensitivity "
                             f"scan, which ranks the blocks: set sensitivity.enabled: true{instead}")
        if frontier.enabled and is_keep_fp_policy(keep_fp):
            raise ValueError(f"frontier.enabled with binarize.keep_fp {keep_fp}: the frontier sets keep_fp per "
                             "point; give binarize.keep_fp as patterns (kept at every point) or leave it empty")
        blocks = self.sensitivity.blocks  # known before the scan only when given
        asked = [(f"binarize.keep_fp.from_sensitivity {keep_fp['from_sensitivity']}", keep_fp["from_sensitivity"])
                 ] if is_keep_fp_policy(keep_fp) and "from_sensitivity" in keep_fp else []
        if frontier.enabled:
            asked += [(f"frontier.keep {k}", k) for k in frontier.keep]
        for what, k in asked:
            if blocks is not None and k > len(blocks):
                raise ValueError(f"{what} is more than the {len(blocks)} blocks of sensitivity.blocks "
                                 f"({', '.join(blocks)}); valid: 0 to {len(blocks)}")

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser().resolve()

    def enabled(self) -> list[str]:
        """The stages this pipeline runs, in order."""
        optional = {"pretrain": self.pretrain.enabled, "sensitivity": self.sensitivity.enabled,
                    "export": self.export.enabled, "frontier": self.frontier.enabled}
        return [s for s in STAGES if optional.get(s, True)]

    def training_spec(self) -> BinarizeSpec:
        """The binarize section as the training stages receive it: a keep_fp policy without its own
        `precision` is priced at export.precision (the size of the file the export stage writes)."""
        keep_fp = self.binarize.keep_fp
        if is_keep_fp_policy(keep_fp) and "precision" not in keep_fp:
            return dataclasses.replace(self.binarize, keep_fp={**keep_fp, "precision": self.export.precision})
        return self.binarize

    def stage_configs(self) -> dict[str, object]:
        """Every stage's own config (stages.registry's types), composed from this file's sections."""
        loader = self.data.loader()
        t, p = self.teacher, self.pretrain

        def training(name: str, section: TrainSection, binarize: BinarizeSpec | None) -> TrainConfig:
            return TrainConfig(name=name, seed=section.seed, init=section.init, model=self.model,
                               data=loader, binarize=binarize, algorithm=section.algorithm, optim=section.optim,
                               distill=section.distill, distributed=self.distributed)

        def optim(epochs: int, lr: float) -> OptimConfig:
            return OptimConfig(epochs=epochs, lr=lr)

        teacher_run = None
        if t.source == "train":  # full precision, from random weights, with the default optimizer
            teacher_run = training("teacher", TrainSection(init="random", optim=optim(t.epochs, t.lr)), None)
        configs = {
            "data": DataStageConfig(train=self.data.train, test=self.data.test, shard_size=self.data.shard_size),
            "teacher": TeacherConfig(source=t.source, path=t.path, uri=t.uri, model=self.model,
                                     eval_limit=loader.eval_limit, training=teacher_run),
            "pretrain": training("pretrain", TrainSection(  # the train section's BatchNorm re-estimation too
                seed=self.train.seed, optim=optim(p.epochs, p.lr),
                algorithm=AlgorithmConfig(bn_recalibration_batches=self.train.algorithm.bn_recalibration_batches)),
                                 self.training_spec()),
            "train": training("train", self.train, self.training_spec()),
            "sensitivity": SensitivityConfig(**{f.name: getattr(self.sensitivity, f.name)
                                                for f in dataclasses.fields(SensitivityConfig)}),
            "export": ExportConfig(eval_limit=loader.eval_limit, precision=self.export.precision),
        }
        f = self.frontier  # the train and export stages' own configs, and the points
        configs["frontier"] = FrontierConfig(training=configs["train"], export=configs["export"], keep=f.keep,
                                             budget_bytes=f.budget_bytes, budget_ratio=f.budget_ratio, by=f.by)
        return {k: copy.deepcopy(v) for k, v in configs.items()}  # no object is shared between two stages

    def stage_config(self, name: str):
        """One stage's config (see stage_configs)."""
        from stages.registry import get

        get(name)  # an unknown name: ValueError listing the stages
        return self.stage_configs()[name]

    def check_keep_fp(self) -> None:
        """binarize.keep_fp and every frontier point, checked on the meta-device model before any stage runs
        (stages.mixed.check_policies): K beyond the model's blocks, a budget no export meets, patterns that
        match no layer are refused at once, not after the stages before them have trained."""
        from stages.mixed import NO_BAT, check_policies

        if not self.binarize.keep_fp and not self.frontier.enabled:  # nothing to check: no config built
            return
        configs = self.stage_configs()
        train = configs["train"]
        spec = train.binarize
        policies = [("binarize.keep_fp", spec.keep_fp)] if spec is not None and spec.keep_fp else []
        if self.frontier.enabled:
            if self.frontier.by == "drop_bat" and self.sensitivity.bat_steps < 1:
                raise ValueError(f"frontier.by: drop_bat {NO_BAT}")
            policies += [(f"frontier point {label}", policy) for label, policy in configs["frontier"].points()]
        if policies:
            check_policies(train, policies, self.export.precision, self.sensitivity.blocks,
                           bat=self.sensitivity.bat_steps >= 1)

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
        raise located(path, overrides, e) from None
