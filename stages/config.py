"""The one training schema: `TrainConfig`, what `pcpp train`, the pipeline's training stages (teacher
training, pre-training, train), the sweep's trials and the benchmarks all hand to the engine.

`load_config(path, overrides=["optim.lr=0.01", ...])` reads a YAML file into a `TrainConfig`; every
section is a dataclass bound by its annotations (stages.schema): a misspelt key or a value of the wrong
type fails at once, every error of the file together, with the valid keys listed (torchtune's rule).
Relative paths are taken from the directory the command runs in and made absolute at load.

In a pipeline, the training stages receive a TrainConfig composed from the pipeline's sections
(pipelines.config); the paths that come from their input artifacts (shards, teacher and student
checkpoints) and the tracking settings of the run are filled in by the stage (stages.train.bind).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pcpp.rules import rule_names
from pcpp.schedules import LR_SCHEDULES
from pcpp.surgery import BinarizeSpec
from stages.hashing import digest
from stages.schema import (  # noqa: F401  (re-exported: the pipeline and sweep configs use them)
    DEEPSPEED,
    PATH,
    URI,
    ConfigDocument,
    ConfigError,
    absolute,
    apply_overrides,
    build,
    located,
    read_yaml,
    renamed,
)

# Where a student's weights start: the teacher's (fine-tuning, FT) or random (end-to-end, E2E).
INITS = ("teacher", "random")
PIPELINE_OF_INIT = {"teacher": "ft", "random": "e2e"}  # the paper's names: FT and E2E pipelines
INIT_OF_PIPELINE = {v: k for k, v in PIPELINE_OF_INIT.items()}  # the key `pipeline` of earlier releases
OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class ModelConfig:
    name: str = "resnet20"
    kwargs: dict = field(default_factory=dict)
    num_classes: int = 10


@dataclass
class DataConfig:
    train: str = field(default="", metadata=PATH)  # shard directory (pcpp prepare)
    test: str = field(default="", metadata=PATH)
    batch_size: int = 128  # global batch, split over workers
    num_workers: int = 0  # DataLoader workers per training worker
    epoch_length: int | None = None  # samples per epoch (all ranks); default: the train set size
    eval_limit: int | None = None  # evaluate on the first N test samples only

    def __post_init__(self):
        for key in ("batch_size", "epoch_length", "eval_limit"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"data.{key} must be >= 1, got {value}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class AlgorithmConfig:
    rule: str = "pc++"  # pc++ | pq | rpc | ptb
    params: dict = field(default_factory=dict)  # the rule's schedules, e.g. {rho: {kind: linear, ...}}
    # Training batches (per worker) over which each epoch re-estimates the BatchNorm statistics under the
    # honest binarized forward before the honest evaluation (pcpp.calibration.recalibrate_batchnorm_); at
    # most one epoch's worth; 0 turns it off. Binarized models with BatchNorm only.
    bn_recalibration_batches: int = 50

    def __post_init__(self):
        if self.rule not in rule_names():
            raise ValueError(f"unknown algorithm.rule {self.rule!r}; valid: {', '.join(rule_names())}")
        if isinstance(self.bn_recalibration_batches, bool) or not isinstance(self.bn_recalibration_batches, int) \
                or self.bn_recalibration_batches < 0:
            raise ValueError(f"algorithm.bn_recalibration_batches must be an integer >= 0 (0: off), "
                             f"got {self.bn_recalibration_batches!r}")


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


# How a run is carried out, not what it computes: where its checkpoints live, how often Ray restarts its
# workers, how it places them. Left out of TrainConfig.digest() (the run directory of `pcpp train`), so
# that a relaunch with another storage path or failure budget finds the same run (see `keyed_dict`).
RUNTIME = {"runtime": True}
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's ScalingConfig strategies
# pyarrow filesystems Ray Train's storage_path accepts by URI scheme (a plain path is a local / mounted one)
STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


@dataclass
class DistributedConfig:
    num_workers: int = 1
    use_gpu: bool = False
    # A preset shipped in cluster/deepspeed/ (cpu: fp32 ZeRO-1; v100: fp16 + ZeRO-2) or a JSON file's path.
    deepspeed: str = field(default="cpu", metadata=DEEPSPEED)
    zero_stage: int | None = None  # overrides the file's ZeRO stage when set
    # Ray Train's RunConfig(storage_path): where every epoch's checkpoint is persisted. None: under the run
    # directory (inside the run root); on a cluster a mount every node sees, or a URI (s3://bucket/prefix).
    storage_path: str | None = field(default=None, metadata={**URI, **RUNTIME})
    # FailureConfig(max_failures): worker-group restarts from the last checkpoint (-1: no limit, 0: none)
    max_failures: int = field(default=2, metadata=RUNTIME)
    checkpoints_to_keep: int = field(default=2, metadata=RUNTIME)  # CheckpointConfig(num_to_keep)
    placement_strategy: str = field(default="PACK", metadata=RUNTIME)  # ScalingConfig(placement_strategy)

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"distributed.num_workers must be >= 1, got {self.num_workers}")
        if self.zero_stage not in (None, 0, 1, 2, 3):
            raise ValueError(f"distributed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.max_failures < -1:
            raise ValueError(f"distributed.max_failures must be -1 (no limit), 0 (no restart) or more, got "
                             f"{self.max_failures}")
        if self.checkpoints_to_keep < 1:
            raise ValueError(f"distributed.checkpoints_to_keep must be >= 1 (a resume needs the last one), got "
                             f"{self.checkpoints_to_keep}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"unknown distributed.placement_strategy {self.placement_strategy!r}; valid: "
                             f"{', '.join(PLACEMENT_STRATEGIES)}")
        if self.storage_path is not None:
            check_storage_path(self.storage_path)


def check_storage_path(value: str) -> str:
    """A local path or a URI of a filesystem pyarrow has (s3://, gs://, hdfs://, ...); ValueError otherwise."""
    looks_like_uri = re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", value) is not None
    scheme = value.split(":", 1)[0].lower() if looks_like_uri else ""
    if not value.strip() or (scheme and (scheme not in STORAGE_SCHEMES or "://" not in value)):
        raise ValueError(f"distributed.storage_path {value!r} is neither a path nor a URI of a known filesystem; "
                         f"valid schemes: {', '.join(STORAGE_SCHEMES)} (or a path, e.g. a shared mount)")
    return value


def keyed_dict(obj) -> dict:
    """`dataclasses.asdict(obj)` without the RUNTIME fields, at any depth (what a config computes, not how
    the run is carried out), and with the quantizer specs of every node that names them in its
    `QUANTIZER_ROLES` (field -> role: BinarizeSpec, SensitivityConfig) as they resolve (pair, schedules and
    options, `pcpp.specs.make_quantizer` in their role): a change of a registered default schedule changes
    the run directories and stage keys of the configs that relied on it, so no finished run is reported
    as the new default's and no run resumes under another schedule."""
    from pcpp.specs import make_quantizer

    out = dataclasses.asdict(obj)

    def drop(node, data: dict) -> None:
        for fname, role in getattr(type(node), "QUANTIZER_ROLES", {}).items():
            q = make_quantizer(getattr(node, fname), role)
            data[fname] = None if q is None else q.state()
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            # runtime settings, and an empty field marked omit_empty (binarize.keep_fp: []): keys made before
            # the field existed stay valid
            if f.metadata.get("runtime") or (f.metadata.get("omit_empty") and isinstance(value, (list, dict))
                                             and not value):
                data.pop(f.name, None)
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                drop(value, data[f.name])

    drop(obj, out)
    return out


RESOLVED_CONFIG = "config.resolved.json"  # beside config.yaml: keyed_dict(cfg), defaults resolved when the run began


def resolved_config(cfg) -> dict:
    """`keyed_dict(cfg)` as config.resolved.json holds it (through JSON: tuples are lists), so that a planned
    config and a recorded one compare equal exactly when they compute the same."""
    return json.loads(json.dumps(keyed_dict(cfg), sort_keys=True, default=str))


def write_run_config(run_dir: str | Path, cfg) -> None:
    """A run directory's record of its config: config.yaml (as given) and config.resolved.json
    (`resolved_config`: the quantizer pairs with the schedules and options they resolved to when the run
    began), so that a later change of a registered default cannot make an old run pass for the new default's."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    (run_dir / RESOLVED_CONFIG).write_text(json.dumps(resolved_config(cfg), indent=1, sort_keys=True))


@dataclass
class TrackingConfig:
    experiment: str = "pcpp"
    tracking_uri: str | None = field(default=None, metadata=URI)  # default: MLFLOW_TRACKING_URI, else sqlite
    run_root: str = field(default="runs", metadata=PATH)


@dataclass
class TrainConfig(ConfigDocument):
    name: str = "run"
    seed: int = 0
    init: str = "teacher"  # teacher: fine-tune from the teacher's weights (FT); random: end to end (E2E)
    teacher: str | None = field(default=None, metadata=PATH)  # full-precision checkpoint (FT init, KD teacher)
    # a binarized student's checkpoint loaded after binarize_ (binarized pre-training's output), FT only
    student: str | None = field(default=None, metadata=PATH)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    binarize: BinarizeSpec | None = field(default_factory=BinarizeSpec)  # None: full precision
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        check_init(self.init)

    @property
    def pipeline(self) -> str:
        """The paper's name of the run `init` chooses: "ft" or "e2e" (read-only; the config key is `init`)."""
        return PIPELINE_OF_INIT[self.init]

    @classmethod
    def upgrade(cls, data: dict, where: str) -> dict:
        """The key `pipeline: ft | e2e` of earlier releases, read as `init: teacher | random`."""
        return renamed(data, where, "pipeline", "init", INIT_OF_PIPELINE)

    def digest(self) -> str:
        """A short digest of what the run computes (RUNTIME fields left out): names its run directory."""
        return digest(keyed_dict(self))

    def validate_inputs(self) -> None:
        """The checkpoints this run reads are named: a teacher to fine-tune from and to distil from.

        Checked where the run is complete (load_config, the engine's preflight), not at construction: a
        pipeline's stage config gets its teacher from its input artifact, when the stage runs.
        """
        if self.init == "teacher" and not self.teacher:
            raise ValueError("init 'teacher' fine-tunes from a full-precision model: set teacher: PATH "
                             "(or use init: random for end-to-end training from random weights)")
        if self.distill.enabled and not self.teacher:
            raise ValueError("distill.enabled needs teacher: PATH (the full-precision teacher)")


def check_init(init) -> str:
    """`init` itself when it is teacher or random; ValueError naming the valid values otherwise."""
    if init not in INITS:
        hint = " (a binarized checkpoint to start from is now `student: PATH`)" if isinstance(init, str) and (
            "/" in init or "." in init) else ""
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}{hint}")
    return init


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read, type and check a training config; relative paths become absolute (from the working directory)."""
    data = apply_overrides(read_yaml(path), overrides or [])
    try:
        cfg = build(TrainConfig, data)
        cfg.validate_inputs()
    except ValueError as e:
        raise located(path, overrides, e) from None
    return absolute(cfg)
