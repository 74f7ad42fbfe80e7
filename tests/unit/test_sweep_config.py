"""Sweep configs checked at load: typed values, the metric the trials report, the mode, useful search names."""

from __future__ import annotations

import pytest
import yaml

from pipelines.sweep import SEARCHABLE, applicable, load_sweep
from stages.engine import EPOCH_METRICS

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `pipeline: p.yaml` is taken from the working directory


def files(tmp_path, sweep: dict, weight="bnn++", rule="pc++"):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "data": {"train": "a", "test": "b"}, "teacher": {"source": "file", "path": "t.th"},
        "binarize": {"weight": weight}, "train": {"algorithm": {"rule": rule}}}))
    (tmp_path / "s.yaml").write_text("pipeline: p.yaml\n" + yaml.safe_dump(sweep))
    return tmp_path / "s.yaml"


def test_values_are_typed_and_the_pipeline_path_is_taken_from_the_working_directory(tmp_path):
    path = files(tmp_path, {})
    path.write_text("pipeline: p.yaml\nsearch: {lr: {low: 1e-5, high: 5E-2, log: true}, mu0: {low: .5, high: 4}}\n"
                    "metric: loss\nmode: min\n")
    cfg, base = load_sweep(path)
    assert cfg.pipeline == str(tmp_path / "p.yaml")
    assert (cfg.search["lr"].low, cfg.search["lr"].high, cfg.search["mu0"].low) == (1e-5, 5e-2, 0.5)
    assert type(cfg.search["mu0"].high) is float
    assert base.data.train == str(tmp_path / "a")


def test_the_metric_must_be_one_the_trials_report(tmp_path):
    with pytest.raises(ValueError) as err:
        load_sweep(files(tmp_path, {"metric": "binary_accuracy"}))
    text = str(err.value)
    assert "metric 'binary_accuracy' is not one the trials report (did you mean 'binary_acc'?)" in text
    assert all(m in text for m in EPOCH_METRICS)
    for metric in EPOCH_METRICS:
        assert load_sweep(files(tmp_path, {"metric": metric}))[0].metric == metric


@pytest.mark.parametrize("sweep, needle", [
    ({"mode": "maximum"}, "unknown mode 'maximum'; valid: max, min"),
    ({"search": {"momentum": {"low": 0, "high": 1}}}, "valid: " + ", ".join(SEARCHABLE)),
    ({"search": {"lr": {"low": 1, "high": 0}}}, "low < high"),
    ({"search": {"lr": {"low": 0, "high": 1, "log": True}}}, "log range needs low > 0"),
    ({"search": {"lr": {"low": 1e-3}}}, "search.lr.high is required"),
    ({"search": {"lr": {"low": "small", "high": 1}}}, "search.lr.low: expected a number, got 'small'"),
    ({"num_samples": 0}, "must be >= 1"),
    ({"scheduler": {"reduction_factor": 1}}, "reduction_factor >= 2"),
    ({"metrics": "loss"}, "unknown key metrics (did you mean 'metric'?)"),
    ({"overrides": "train.seed=1"}, "overrides must be a list of key=value strings"),
])
def test_bad_sweep_configs_are_refused_at_load(tmp_path, sweep, needle):
    with pytest.raises(ValueError) as err:
        load_sweep(files(tmp_path, sweep))
    assert needle in str(err.value)


def test_search_names_must_change_something_in_the_base_pipeline(tmp_path):
    with pytest.raises(ValueError, match=r"search \['mu0'\] change nothing .*weight pair 'bnn'.*searchable there: lr"):
        load_sweep(files(tmp_path, {"search": {"mu0": {"low": 1, "high": 2}}}, weight="bnn"))
    cfg, base = load_sweep(files(tmp_path, {"search": {"rho0": {"low": 0.01, "high": 0.1}}}, weight="bc", rule="pq"))
    assert applicable(base) == ["rho0", "rhoT", "lr"]
    cfg, base = load_sweep(files(tmp_path, {"search": {"muT": {"low": 20, "high": 40}}}))
    assert applicable(base) == ["mu0", "muT", "lr"]
