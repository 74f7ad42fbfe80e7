"""The sweep's searchers inside a real Tune run (a trivial trainable, no training): Optuna's TPE through
OptunaSearch and Tune's BasicVariantGenerator, seeded, conditional spaces resolved, trials in creation order."""

from __future__ import annotations

import pytest

from pipelines.config import PipelineConfig
from pipelines.sweep import _in_order, _trial_dirname
from pipelines.sweep_space import parse_search, search_alg, trial_values
from stages.config import build

pytestmark = pytest.mark.integration

SEARCH = {"binarize.weight.mu.kind": {"choice": ["linear", "loglinear"]},
          "binarize.weight.mu.start": {"depends_on": "binarize.weight.mu.kind",
                                       "cases": {"linear": {"uniform": [0.0, 2.0]}, "loglinear": 0.5}},
          "binarize.weight.mu.end": {"loguniform": [5.0, 100.0]},
          "binarize.units": {"choice": ["scaled", "raw"]}}


def run(searcher: str, seed: int, tmp_path) -> list[dict]:
    from ray import tune

    def score(config):  # defined here: pickled by value (the workers cannot import this test module)
        from pipelines.sweep_space import trial_values

        v = trial_values(config)
        tune.report({"score": v["binarize.weight.mu.end"] - v["binarize.weight.mu.start"]})

    base = build(PipelineConfig, {"data": {"train": "a", "test": "b"}, "teacher": {"source": "file", "path": "t"}})
    param_space, alg = search_alg(parse_search(SEARCH, base, searcher), searcher, seed, "score", "max", 1)
    grid = tune.Tuner(tune.with_resources(score, {"cpu": 0.1}), param_space=param_space,
                      tune_config=tune.TuneConfig(metric="score", mode="max", num_samples=5, search_alg=alg,
                                                  trial_dirname_creator=_trial_dirname),
                      run_config=tune.RunConfig(name=f"{searcher}-{seed}", storage_path=str(tmp_path), verbose=0)
                      ).fit()
    assert not grid.errors, grid.errors
    ordered = _in_order(grid)
    assert len({trial_id for trial_id, _ in ordered}) == 5
    return [trial_values(r.config) for _, r in ordered]


@pytest.mark.parametrize("searcher", ["random", "optuna"])
def test_a_seeded_searcher_gives_the_same_trials_and_resolves_the_conditional(searcher, local_ray, tmp_path):
    first, again = run(searcher, 7, tmp_path / "a"), run(searcher, 7, tmp_path / "b")
    assert first == again  # in creation order, the same configs
    for v in first:
        if v["binarize.weight.mu.kind"] == "loglinear":
            assert v["binarize.weight.mu.start"] == 0.5
        else:
            assert 0.0 <= v["binarize.weight.mu.start"] <= 2.0
        assert 5.0 <= v["binarize.weight.mu.end"] <= 100.0 and v["binarize.units"] in ("scaled", "raw")
