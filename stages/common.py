"""Helpers the pipeline stages share: a stage's model files and MLflow logging of a stage.

Evaluation on shards: stages.data.eval_loader and pcpp.evaluation.accuracy (the one evaluation).

A model artifact holds model.pt (the state dict), recipe.json (how to build the architecture: the
`recipe` of pcpp.models.load) and, for a binarized model, binarize.json (the spec binarize_ applies).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pcpp import models
from stages.artifact import Artifact
from stages.tracking import log_to_run  # noqa: F401  (kept importable here: the stages import it from this module)


def save_model(out: Path, model: torch.nn.Module, recipe: dict, binarize: dict | None = None) -> None:
    """model.pt (state dict), recipe.json (how to build it), binarize.json (the spec, if binarized)."""
    torch.save(model.state_dict(), out / "model.pt")
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1))
    if binarize is not None:
        (out / "binarize.json").write_text(json.dumps(binarize, indent=1))


def recipe_of(model_cfg) -> dict:
    """The recipe (pcpp.models.load) of a config's model section: {"name", "kwargs" with num_classes}."""
    return {"name": model_cfg.name, "kwargs": {**model_cfg.kwargs, "num_classes": model_cfg.num_classes}}


def load_model(artifact: Artifact) -> torch.nn.Module:
    """Rebuild the model an artifact stores (binarized when it carries binarize.json), via pcpp.models.load.

    Raises ValueError when the weights do not fit the recipe and spec, KeyError for a missing file."""
    recipe = json.loads(artifact.file("recipe.json").read_text())
    spec = json.loads(artifact.file("binarize.json").read_text()) if "binarize.json" in artifact.manifest["files"] \
        else None
    return models.load(recipe, spec, weights=artifact.file("model.pt"))


def shard_dirs(data: Artifact) -> tuple[Path, Path]:
    return data.path / "train", data.path / "test"
