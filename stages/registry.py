"""The stages, registered once: name, the typed config it receives, its function, the artifacts it reads.

The stage contract (docs/contracts.md, "Stages and artifacts"): `run(cfg, inputs, out, ctx) -> metrics`,
where `cfg` is an instance of the stage's own config type and nothing else, `inputs` maps input names to
Artifacts, `out` is the directory it writes into, `ctx` the run's StageContext (root, MLflow, its cache key). The stage
key is stages.artifact.stage_key(name, cfg, inputs): exactly the config the stage receives plus its
inputs' digests, so a field a stage reads always changes its key.

To add a stage: write its config dataclass and `run` in a module of stages/, register it here, and
compose its config from the pipeline's sections (pipelines.config.PipelineConfig.stage_configs). A stage
that runs other stages inside it (the frontier) runs them through stages.execute.run_stage, cached as these.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from stages.config import TrainConfig
from stages.data.stage import DataStageConfig
from stages.export import ExportConfig
from stages.frontier import FrontierConfig
from stages.sensitivity import SensitivityConfig
from stages.teacher import TeacherConfig


def _import(path: str) -> Callable:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Stage:
    name: str
    config: type  # the dataclass `run` receives
    function: str  # "module:function", imported when the stage runs
    inputs: tuple[str, ...]  # the stages whose artifacts it reads
    optional_inputs: tuple[str, ...] = ()  # read when the pipeline has them
    # "module:function": config -> the further stages that config makes it read (a keep_fp policy: sensitivity)
    config_inputs: str | None = None
    parent_files: tuple[str, ...] = ()  # files of its artifact the runner logs to the pipeline's parent run

    def load(self) -> Callable:
        return _import(self.function)

    def inputs_for(self, cfg, enabled: list[str]) -> list[str]:
        """The stages this stage reads in a pipeline that runs `enabled`, with its config `cfg`: its inputs,
        the optional ones enabled, and those its config asks for. ValueError when one of the latter is not
        enabled (naming it and why)."""
        deps = [*self.inputs, *(d for d in self.optional_inputs if d in enabled)]
        for d, why in (_import(self.config_inputs)(cfg) if self.config_inputs else {}).items():
            if d not in enabled:
                raise ValueError(f"stage {self.name} reads the {d} stage's artifact ({why}), but {d} is not enabled")
            if d not in deps:
                deps.append(d)
        return deps


TRAINING_INPUTS = "stages.mixed:policy_inputs"  # a keep_fp policy reads the sensitivity scan
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("data", DataStageConfig, "stages.data:run", ()),
    Stage("teacher", TeacherConfig, "stages.teacher:run", ("data",)),
    Stage("pretrain", TrainConfig, "stages.mixed:run_pretrain", ("data", "teacher"), config_inputs=TRAINING_INPUTS),
    Stage("train", TrainConfig, "stages.mixed:run_train", ("data", "teacher"), ("pretrain",),
          config_inputs=TRAINING_INPUTS),
    Stage("sensitivity", SensitivityConfig, "stages.sensitivity:run", ("data", "teacher")),
    Stage("export", ExportConfig, "stages.export:run", ("data", "train")),
    # train and export: its fully binarized point is theirs (the same stage key), so it runs after them
    Stage("frontier", FrontierConfig, "stages.frontier:run", ("data", "teacher", "sensitivity", "train"),
          ("pretrain", "export"), parent_files=("frontier.csv", "frontier.png")),
)}


def names() -> list[str]:
    """The registered stages, in pipeline order."""
    return list(STAGES)


def get(name: str) -> Stage:
    """The stage `name`; ValueError naming the valid ones (and the closest) otherwise."""
    if name not in STAGES:
        close = difflib.get_close_matches(name, STAGES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown stage {name!r}{hint}; valid: {', '.join(STAGES)}")
    return STAGES[name]
