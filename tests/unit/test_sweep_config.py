"""Sweep configs checked at load: typed values, the metric the trials report, the mode, the searcher, the
search paths (dotted paths of the base pipeline, or the short names of earlier releases)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipelines.sweep import load_sweep, spaces, sweep_name
from stages.engine import EPOCH_METRICS

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `pipeline: p.yaml` is taken from the working directory


LR = {"train.optim.lr": {"loguniform": [1e-4, 1e-2]}}


def files(tmp_path, sweep: dict, weight="bnn++", rule="pc++"):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "data": {"train": "a", "test": "b"}, "teacher": {"source": "file", "path": "t.th"},
        "binarize": {"weight": weight}, "train": {"algorithm": {"rule": rule}}}))
    (tmp_path / "s.yaml").write_text("pipeline: p.yaml\n" + yaml.safe_dump({"search": LR, **sweep}))
    return tmp_path / "s.yaml"


def test_values_are_typed_and_the_pipeline_path_is_taken_from_the_working_directory(tmp_path):
    path = files(tmp_path, {})
    path.write_text("pipeline: p.yaml\nsearch: {lr: {low: 1e-5, high: 5E-2, log: true}, mu0: {low: .5, high: 4}}\n"
                    "metric: loss\nmode: min\n")
    cfg, base = load_sweep(path)
    assert cfg.pipeline == str(tmp_path / "p.yaml")
    space = spaces(cfg, base)
    assert space["train.optim.lr"].kind == "loguniform" and space["train.optim.lr"].args == [1e-5, 5e-2]
    assert space["binarize.weight.mu.start"].kind == "uniform" and space["binarize.weight.mu.start"].args == [.5, 4]
    assert type(space["binarize.weight.mu.start"].args[1]) is int  # as written; Tune draws floats from it
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
    ({"searcher": "optona"}, "unknown searcher 'optona' (did you mean 'optuna'?); valid: random, optuna"),
    ({"search": {}}, "search is empty"),
    ({"search": {"momentum": {"low": 0, "high": 1}}},
     "search.momentum: unknown key 'momentum' under the pipeline; valid: name, root, model, data"),
    ({"search": {"train.optim.lrr": {"uniform": [0, 1]}}},
     "search.train.optim.lrr: unknown key 'lrr' under train.optim (did you mean 'lr'?); valid: name, lr"),
    ({"search": {"lr": {"low": 1, "high": 0}}}, "search.lr.uniform: a search range needs lo < hi, got [1, 0]"),
    ({"search": {"lr": {"low": 0, "high": 1, "log": True}}}, "a log range needs lo > 0, got 0"),
    ({"search": {"lr": {"low": 1e-3}}}, "search.lr.high is required"),
    ({"search": {"lr": {"low": "small", "high": 1}}}, "search.lr.uniform: expected a finite number, got 'small'"),
    ({"num_samples": 0}, "must be >= 1"),
    ({"scheduler": {"reduction_factor": 1}}, "reduction_factor >= 2"),
    ({"metrics": "loss"}, "unknown key metrics (did you mean 'metric'?)"),
    ({"overrides": "train.seed=1"}, "overrides must be a list of key=value strings"),
])
def test_bad_sweep_configs_are_refused_at_load(tmp_path, sweep, needle):
    with pytest.raises(ValueError) as err:
        load_sweep(files(tmp_path, sweep))
    assert needle in str(err.value)


def test_every_bad_path_is_reported_at_once_with_the_sweep_file(tmp_path):
    with pytest.raises(ValueError) as err:
        load_sweep(files(tmp_path, {"search": {"train.optim.lrr": {"uniform": [0, 1]},
                                               "binarize.unit": {"choice": ["raw"]}}}))
    text = str(err.value)
    assert text.startswith("2 errors:") and str(tmp_path / "s.yaml") in text
    assert "(did you mean 'lr'?)" in text and "(did you mean 'units'?)" in text


def test_short_names_map_to_the_paths_the_pair_and_rule_have(tmp_path):
    def paths(search, **kw):
        return sorted(spaces(*load_sweep(files(tmp_path, {"search": search}, **kw))))

    r = {"low": 0.01, "high": 0.1}
    assert paths({"mu0": r, "muT": r, "lr": r}) == ["binarize.weight.mu.end", "binarize.weight.mu.start",
                                                   "train.optim.lr"]
    assert paths({"rho0": r, "rhoT": r}, weight="pc") == ["binarize.weight.rho.end", "binarize.weight.rho.start"]
    assert paths({"rho0": r}, weight="bc", rule="pq") == ["train.algorithm.params.rho.start"]
    # a name the base pipeline has no place for is refused, naming what is there
    with pytest.raises(ValueError, match=r"search.mu0: unknown key 'mu' under binarize.weight; valid: \(none\) "
                                         r"\(pair 'bnn' as weight\)"):
        load_sweep(files(tmp_path, {"search": {"mu0": r}}, weight="bnn"))
    with pytest.raises(ValueError, match=r"unknown key 'rho' under train.algorithm.params; valid: \(none\) "
                                         r"\(rule 'pc\+\+'\)"):
        load_sweep(files(tmp_path, {"search": {"rho0": r}}, weight="bc"))


def test_every_shipped_sweep_yaml_loads(monkeypatch):
    monkeypatch.chdir(REPO)  # their paths are relative to the repository
    shipped = sorted((REPO / "pipelines" / "configs").glob("sweep_*.yaml"))
    assert len(shipped) >= 4, shipped
    for path in shipped:
        cfg, base = load_sweep(path)
        assert spaces(cfg, base), path
        assert path.read_text().startswith("#") and "pcpp sweep" in path.read_text().split("\n\n")[0], path


def test_the_readme_example_loads(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Sweeps and reports"):text.index("## Security")]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "s.yaml").write_text(example)
    monkeypatch.chdir(REPO)
    cfg, base = load_sweep(tmp_path / "s.yaml")
    assert cfg.searcher == "optuna" and spaces(cfg, base)["binarize.weight.mu.start"].depends_on


def test_the_sweep_name_is_the_same_for_the_same_sweep_and_differs_for_another(tmp_path):
    """A rerun finds (and resumes) its experiment by this name; a changed search, seed or budget starts anew;
    where or how fast the trials run does not change it."""
    name = sweep_name(*load_sweep(files(tmp_path, {})))
    assert re.fullmatch(r".+-sweep-[0-9a-f]{8}", name), name
    assert sweep_name(*load_sweep(files(tmp_path, {"max_concurrent_trials": 1, "out": "elsewhere.yaml"}))) == name
    for changed in ({"seed": 1}, {"num_samples": 9}, {"epochs": 3}, {"searcher": "optuna"},
                    {"search": {"train.optim.lr": {"loguniform": [1e-4, 1e-3]}}}):
        assert sweep_name(*load_sweep(files(tmp_path, changed))) != name, changed
    assert sweep_name(*load_sweep(files(tmp_path, {"overrides": ["train.seed=3"]}))) != name  # the base pipeline
