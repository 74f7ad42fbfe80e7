"""Search spaces of `pcpp sweep` (pipelines.sweep_space): paths, Tune domains, conditionals, seeded sampling.

The sampling tests draw configs through Tune's own searchers (BasicVariantGenerator, OptunaSearch.suggest)
without running any trial: no Ray cluster is started.
"""

from __future__ import annotations

import pytest

from pipelines.config import PipelineConfig
from pipelines.sweep_space import apply_values, leaf_type, parse_search, search_alg, trial_values, tune_param_space
from stages.config import ConfigError, build

pytestmark = pytest.mark.unit

MU_KIND = {"binarize.weight.mu.kind": {"choice": ["linear", "loglinear"]},
           "binarize.weight.mu.start": {"depends_on": "binarize.weight.mu.kind",
                                        "cases": {"linear": {"uniform": [0.0, 2.0]},
                                                  "loglinear": {"loguniform": [0.1, 2.0]}}}}


def pipeline(weight="bnn++", activation=None, rule="pc++") -> PipelineConfig:
    return build(PipelineConfig, {"data": {"train": "a", "test": "b"}, "teacher": {"source": "file", "path": "t"},
                                  "binarize": {"weight": weight, "activation": activation},
                                  "train": {"algorithm": {"rule": rule}}})


def refused(search: dict, base=None, searcher="random") -> str:
    with pytest.raises(ConfigError) as err:
        parse_search(search, base or pipeline(), searcher)
    return str(err.value)


def test_paths_resolve_to_the_field_types_of_the_pipeline_and_of_the_pair_and_rule():
    base = pipeline(activation="bnn++", rule="pq")
    assert leaf_type("train.optim.lr", base) is float
    assert leaf_type("binarize.units", base) is str
    assert leaf_type("binarize.weight.mu.end", base) is float
    assert leaf_type("binarize.weight.mu.kind", base) is str
    assert leaf_type("binarize.activation.mu.start", base) is float
    assert leaf_type("train.algorithm.params.rho.end", base) is float
    assert leaf_type("binarize.weight", base) == "spec"


@pytest.mark.parametrize("search, needle", [
    ({"train.optim.lrr": {"uniform": [0, 1]}}, "search.train.optim.lrr: unknown key 'lrr' under train.optim "
                                               "(did you mean 'lr'?); valid: name, lr,"),
    ({"train.optim": {"choice": [1]}}, "search.train.optim: train.optim is a section, not a value; its keys: name"),
    ({"train.optim.lr.x": {"choice": [1]}}, "train.optim.lr holds a value (0.001), not keys"),
    ({"binarize.weight.muu.end": {"uniform": [1, 2]}}, "unknown key 'muu' under binarize.weight (did you mean 'mu'?)"
                                                       "; valid: mu (pair 'bnn++' as weight)"),
    ({"binarize.weight.mu.stop": {"uniform": [1, 2]}}, "unknown key 'stop' under binarize.weight.mu; valid: kind, "
                                                       "start, end"),
    ({"binarize.activation.mu.end": {"uniform": [1, 2]}}, "binarize.activation is not set in the base pipeline"),
    ({"binarize.units": {"uniform": [0, 1]}}, "search.binarize.units: uniform needs a numeric field, but "
                                              "binarize.units holds str; use choice or grid"),
    ({"train.seed": {"uniform": [0, 1]}}, "train.seed holds an integer: use randint, choice or grid, not uniform"),
    ({"train.optim.lr": {"choice": []}}, "search.train.optim.lr.choice: expected a non-empty list, got []"),
    ({"train.optim.lr": {"unifrom": [0, 1]}}, "unknown space 'unifrom' (did you mean 'uniform'?); valid: one of "
                                              "uniform, loguniform, randint, choice, grid, or depends_on"),
    ({"train.optim.lr": {"uniform": [0, 1, 2]}}, "expected [lo, hi], got [0, 1, 2]"),
    ({"train.optim.lr": 0.1}, "expected a mapping such as {uniform: [lo, hi]}"),
    ({"train.seed": {"randint": [0, 1.5]}}, "search.train.seed.randint: expected integers"),
    ({"binarize.units": {"choice": ["scaled", "rawx"]}}, "search.binarize.units: binarize.units='rawx' is refused "
                                                         "by the base pipeline: unknown units 'rawx'"),
    # a loglinear schedule needs start > 0: refused where a value could break the base's (bnn++'s) kind
    ({"binarize.weight.mu.start": {"uniform": [0, 1]}}, "binarize.weight.mu.start=0 is refused by the base "
                                                        "pipeline: loglinear schedule needs positive end points"),
    ({**MU_KIND, "binarize.weight.mu.start": {"depends_on": "binarize.weight.mu.kind",
                                              "cases": {"linear": 1.0, "loglinear": {"uniform": [0.0, 1]}}}},
     "search.binarize.weight.mu.start.cases.loglinear: binarize.weight.mu.kind='loglinear', "
     "binarize.weight.mu.start=0.0 is refused"),
    ({**MU_KIND, "binarize.weight.mu.start": {"depends_on": "binarize.weight.mu.kind", "cases": {"linear": 1.0}}},
     "cases: one case per value of binarize.weight.mu.kind (linear, loglinear); missing: loglinear"),
    ({"binarize.weight.mu.start": {"depends_on": "binarize.weight.mu.kind", "cases": {"linear": 1.0}}},
     "depends_on: 'binarize.weight.mu.kind' is not a searched choice or grid; searched ones: (none)"),
    ({**MU_KIND, "binarize.weight.mu.end": {"depends_on": "binarize.weight.mu.kind",
                                            "cases": {"linear": {"grid": [1, 2]}, "loglinear": 3}}},
     "a case cannot be a grid (use choice)"),
])
def test_bad_spaces_are_refused_naming_the_path_and_the_valid_ones(search, needle):
    assert needle in refused(search)


def test_grid_and_non_scalar_choices_need_the_random_searcher():
    assert "grid needs searcher random" in refused({"train.optim.lr": {"grid": [1e-3, 1e-2]}}, searcher="optuna")
    spec = {"binarize.weight": {"choice": [{"name": "bnn++", "mu": 3.0}, "bnn"]}}
    assert "Optuna chooses among None, bool, int, float and str only" in refused(spec, searcher="optuna")
    assert list(parse_search(spec, pipeline())) == ["binarize.weight"]  # random: any value the pipeline takes
    assert "unknown searcher 'tpe'; valid: random, optuna" in refused({}, searcher="tpe")


def test_each_space_becomes_the_matching_tune_domain():
    from ray.tune.search.sample import Categorical, Float, Function, Integer, LogUniform, Uniform

    space = parse_search({"train.optim.lr": {"loguniform": [1e-4, 1e-2]}, "binarize.weight.mu.end": {"uniform":
                          [10, 40]}, "train.seed": {"randint": [0, 3]}, "binarize.units": {"choice": ["scaled", "raw"]},
                          "train.optim.epochs": {"grid": [1, 2]}, **MU_KIND}, pipeline())
    tune = tune_param_space(space)
    lr, end, seed, units = (tune[k] for k in ("train.optim.lr", "binarize.weight.mu.end", "train.seed",
                                               "binarize.units"))
    assert isinstance(lr, Float) and isinstance(lr.sampler, LogUniform) and (lr.lower, lr.upper) == (1e-4, 1e-2)
    assert isinstance(end, Float) and isinstance(end.sampler, Uniform) and (end.lower, end.upper) == (10, 40)
    assert isinstance(seed, Integer) and (seed.lower, seed.upper) == (0, 4)  # ours includes 3, Tune's excludes 4
    assert isinstance(units, Categorical) and units.categories == ["scaled", "raw"]
    assert tune["train.optim.epochs"] == {"grid_search": [1, 2]}
    assert isinstance(tune["binarize.weight.mu.start"], Function)  # tune.sample_from over the cases' draws
    assert isinstance(tune["binarize.weight.mu.start|loglinear"].sampler, LogUniform)


def test_values_reach_the_spec_in_its_mapping_form_and_only_the_searched_fields_change():
    base = pipeline(activation="bnn++", rule="pq").to_dict()
    d = apply_values(base, {"binarize.weight.mu.end": 12.0, "binarize.activation.mu.kind": "linear",
                            "train.algorithm.params.rho.start": 0.5, "train.optim.lr": 0.01,
                            "binarize.weight.mu.start|linear": 99.0})  # a case's own draw is not a value
    assert d["binarize"]["weight"] == {"name": "bnn++", "mu": {"kind": "loglinear", "start": 1.25, "end": 12.0}}
    assert d["binarize"]["activation"] == {"name": "bnn++", "mu": {"kind": "linear", "start": 0.5, "end": 10.0}}
    assert d["train"]["algorithm"]["params"] == {"rho": {"kind": "linear", "start": 0.5, "end": 10.0}}
    assert d["train"]["optim"]["lr"] == 0.01 and base["binarize"]["weight"] == "bnn++"  # the base is not changed
    built = build(PipelineConfig, d)
    assert built.binarize.weight["mu"]["end"] == 12.0
    # a pair chosen whole comes before its own schedule's field
    d = apply_values(base, {"binarize.weight.mu.end": 7.0, "binarize.weight": "bnn+"})
    assert d["binarize"]["weight"] == {"name": "bnn+", "mu": {"kind": "constant", "start": 5.0, "end": 7.0}}


def sample_random(space, n: int, seed: int) -> list[dict]:
    from ray.tune.experiment import Experiment

    param_space, alg = search_alg(space, "random", seed, "binary_acc", "max", max_concurrent=n)
    alg.add_configurations([Experiment("x", lambda config: None, config=param_space, num_samples=n)])
    return [trial_values(alg.next_trial().config) for _ in range(n)]


def sample_optuna(space, n: int, seed: int) -> list[dict]:
    _, alg = search_alg(space, "optuna", seed, "binary_acc", "max", max_concurrent=n)
    return [trial_values(alg.suggest(f"t{i}")) for i in range(n)]


@pytest.mark.parametrize("sample", [sample_random, sample_optuna])
def test_seeded_sampling_is_reproducible_and_honours_the_conditional(sample):
    space = parse_search({**MU_KIND, "binarize.weight.mu.end": {"loguniform": [5.0, 100.0]},
                          "binarize.units": {"choice": ["scaled", "raw"]}, "train.seed": {"randint": [0, 3]}},
                         pipeline(), "random" if sample is sample_random else "optuna")
    first, again, other = sample(space, 8, 3), sample(space, 8, 3), sample(space, 8, 4)
    assert first == again and first != other
    for v in first:
        assert set(v) == {"binarize.weight.mu.kind", "binarize.weight.mu.start", "binarize.weight.mu.end",
                          "binarize.units", "train.seed"}
        assert 5.0 <= v["binarize.weight.mu.end"] <= 100.0 and v["train.seed"] in (0, 1, 2, 3)
        assert type(v["train.seed"]) is int and type(v["binarize.weight.mu.end"]) is float
        lo = 0.0 if v["binarize.weight.mu.kind"] == "linear" else 0.1
        assert lo <= v["binarize.weight.mu.start"] <= 2.0
        build(PipelineConfig, apply_values(pipeline().to_dict(), v))  # every sampled config is a valid pipeline
    assert {v["binarize.weight.mu.kind"] for v in first} == {"linear", "loglinear"}


def test_a_grid_is_walked_in_order_num_samples_times_with_random_draws_beside_it():
    space = parse_search({"train.optim.lr": {"grid": [1e-3, 1e-2]}, "binarize.weight.mu.end": {"uniform": [10, 40]}},
                         pipeline())
    got = sample_random(space, 4, 0)
    assert [v["train.optim.lr"] for v in got] == [1e-3, 1e-2, 1e-3, 1e-2]
    assert len({v["binarize.weight.mu.end"] for v in got}) == 4
