"""The stages, registered once: name, the typed config it receives, its function, the artifacts it reads.

The stage contract (docs/contracts.md, "Stages and artifacts"): `run(cfg, inputs, out, ctx) -> metrics`,
where `cfg` is an instance of the stage's own config type and nothing else, `inputs` maps input names to
Artifacts, `out` is the directory it writes into, `ctx` the run's StageContext (root, MLflow, its cache key). The stage
key is stages.artifact.stage_key(name, cfg, inputs): exactly the config the stage receives plus its
inputs' digests, so a field a stage reads always changes its key.

To add a stage: write its config dataclass and `run` in a module of stages/, register it here, and
compose its config from the pipeline's sections (pipelines.config.PipelineConfig.stage_configs).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from stages.config import TrainConfig
from stages.data.stage import DataStageConfig
from stages.export import ExportConfig
from stages.sensitivity import SensitivityConfig
from stages.teacher import TeacherConfig


@dataclass(frozen=True)
class Stage:
    name: str
    config: type  # the dataclass `run` receives
    function: str  # "module:function", imported when the stage runs
    inputs: tuple[str, ...]  # the stages whose artifacts it reads
    optional_inputs: tuple[str, ...] = ()  # read when the pipeline has them

    def load(self) -> Callable:
        module, _, attr = self.function.partition(":")
        return getattr(importlib.import_module(module), attr)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("data", DataStageConfig, "stages.data:run", ()),
    Stage("teacher", TeacherConfig, "stages.teacher:run", ("data",)),
    Stage("pretrain", TrainConfig, "stages.train:run_pretrain", ("data", "teacher")),
    Stage("train", TrainConfig, "stages.train:run_train", ("data", "teacher"), ("pretrain",)),
    Stage("sensitivity", SensitivityConfig, "stages.sensitivity:run", ("data", "teacher")),
    Stage("export", ExportConfig, "stages.export:run", ("data", "train")),
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
