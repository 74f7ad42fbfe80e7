"""Typed training configs: YAML round trip, overrides, unknown keys refused with the valid ones listed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.config import TrainConfig, build, load_config

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_loads_and_round_trips(tmp_path):
    cfg = load_config(REPO / "pipelines" / "configs" / "resnet20_ft_bnnpp.yaml")
    assert cfg.binarize.weight == "bnn++" and cfg.binarize.task == "BW"
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and again.digest() == cfg.digest()


def test_overrides_are_typed_yaml_values():
    cfg = load_config(REPO / "pipelines" / "configs" / "resnet20_ft_bnnpp.yaml",
                      ["optim.lr=0.01", "binarize.activation=bnn++", "binarize.accumulator_bits=8"])
    assert cfg.optim.lr == 0.01 and cfg.binarize.task == "BWAA"


@pytest.mark.parametrize("data, needle", [
    ({"optim": {"learning_rate": 1}}, "valid keys: name, lr"),
    ({"binarize": {"weights": "bnn"}}, "weights"),
    ({"bogus": 1}, "valid keys: name, seed"),
    ({"binarize": {"weight": "bnnx"}}, "valid: fp, bc"),
    ({"algorithm": {"rule": "sgd"}}, "valid: pc++, pq, rpc, ptb"),
    ({"optim": {"name": "lamb"}}, "valid: adam, adamw, sgd"),
])
def test_bad_config_is_refused_with_the_valid_values(data, needle):
    base = {"init": "random"}
    base.update(data)
    with pytest.raises(ValueError) as err:
        build(TrainConfig, base)
    assert needle in str(err.value)


@pytest.mark.parametrize("text", ["init: teacher\n", "init: random\ndistill: {enabled: true}\n"])
def test_a_run_that_reads_a_teacher_must_name_one(tmp_path, text):
    """Checked on the complete config (a pipeline stage's config gets its teacher from its input when it runs)."""
    cfg = build(TrainConfig, yaml.safe_load(text))  # a stage config: the teacher is filled in later
    with pytest.raises(ValueError, match="teacher: PATH"):
        cfg.validate_inputs()
    with pytest.raises(ValueError, match="teacher: PATH"):
        load_config(write(tmp_path, text))


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ValueError, match="mapping"):
        load_config(tmp_path / "list.yaml")


# -- typed at load (issue 13, item 2) ---------------------------------------------------------------------
def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("spelling, value", [("1e-3", 1e-3), ("1E-3", 1e-3), (".5", 0.5), ("+2.5e+1", 25.0),
                                             ("3", 3.0), ("0.01", 0.01), ("1_000.5", 1000.5)])
def test_numbers_in_any_yaml_spelling_become_floats(tmp_path, spelling, value):
    cfg = load_config(write(tmp_path, f"init: random\noptim: {{lr: {spelling}, momentum: {spelling}}}\n"))
    assert type(cfg.optim.lr) is float and cfg.optim.lr == pytest.approx(value)
    assert type(cfg.optim.momentum) is float
    over = load_config(write(tmp_path, "init: random\n"), [f"optim.lr={spelling}"])
    assert type(over.optim.lr) is float and over.optim.lr == pytest.approx(value)


def test_names_stay_strings_and_integers_stay_integers(tmp_path):
    cfg = load_config(write(tmp_path, "init: random\nname: 1.10\ntracking: {experiment: 2024}\nseed: 1e1\n"
                                      "optim: {epochs: 2.0}\ndata: {batch_size: 1e2}\nmodel: {name: resnet20}\n"
                                      "binarize: {weight: {name: bnn++, mu: 1e1}}\n"))
    assert cfg.name == "1.10" and cfg.tracking.experiment == "2024"
    assert cfg.seed == 10 and type(cfg.seed) is int
    assert cfg.optim.epochs == 2 and type(cfg.optim.epochs) is int
    assert cfg.data.batch_size == 100 and type(cfg.data.batch_size) is int
    assert cfg.binarize.weight == {"name": "bnn++", "mu": 10.0}  # free-form sections: YAML 1.2 numbers
    over = load_config(write(tmp_path, "init: random\n"), ["name=1.10", "tracking.experiment=2024"])
    assert over.name == "1.10" and over.tracking.experiment == "2024"
    assert build(TrainConfig, {"init": "random", "optim": {"lr": "1e-3"}}).optim.lr == 1e-3  # another reader's text


def test_every_wrong_type_of_a_file_is_refused_at_once_naming_its_key(tmp_path):
    from stages.config import ConfigError

    path = write(tmp_path, "init: random\nname: {a: 1}\noptim: {lr: fast, epochs: 1.5, bogus: 2}\n"
                           "distributed: {use_gpu: 1, num_workers: two}\ndistill: {enabled: maybe}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert text.startswith(f"{path}: 7 errors:")
    for needle in ("name: expected a string, got a mapping", "optim.lr: expected a number, got 'fast'",
                   "optim.epochs: expected an integer, got '1.5'", "unknown key optim.bogus",
                   "distributed.use_gpu: expected true or false, got '1'",
                   "distributed.num_workers: expected an integer, got 'two'",
                   "distill.enabled: expected true or false, got 'maybe'"):
        assert needle in text, needle
    with pytest.raises(ValueError, match="optim.lr: expected a number, got 'fast'"):
        load_config(write(tmp_path, "init: random\n"), ["optim.lr=fast"])


def test_pipeline_configs_are_typed_by_the_same_reader(tmp_path):
    from pipelines.config import load_pipeline

    base = "data: {train: a, test: b}\nteacher: {source: file, path: t.th}\n"
    pc = load_pipeline(write(tmp_path, base + "name: 1.10\ntracking: {experiment: 2024}\n"
                                              "train: {optim: {lr: 1E-3}}\npretrain: {lr: .5}\n"))
    assert pc.name == "1.10" and pc.tracking.experiment == "2024"
    assert pc.train.optim.lr == 1e-3 and pc.pretrain.lr == 0.5
    with pytest.raises(ValueError) as err:
        load_pipeline(write(tmp_path, base + "train: {optim: {lr: fast}}\ndata: {batch_size: big}\n"))
    assert "train.optim.lr: expected a number, got 'fast'" in str(err.value)


@pytest.mark.parametrize("old, new", [("ft", "teacher"), ("e2e", "random")])
def test_the_old_pipeline_key_is_read_as_init_with_a_deprecation_warning(tmp_path, old, new):
    from pipelines.config import load_pipeline

    with pytest.warns(DeprecationWarning, match=f"config key pipeline is deprecated: use init: {new}"):
        cfg = load_config(write(tmp_path, f"pipeline: {old}\nteacher: t.th\n"))
    assert cfg.init == new and cfg.pipeline == old  # a read-only property: the paper's FT / E2E
    assert "pipeline" not in cfg.to_dict() and load_config(write(tmp_path, cfg.to_yaml())) == cfg
    with pytest.raises(AttributeError):
        cfg.pipeline = "ft"
    base = "data: {train: a, test: b}\nteacher: {source: file, path: t.th}\n"
    with pytest.warns(DeprecationWarning, match=f"train.pipeline is deprecated: use train.init: {new}"):
        pc = load_pipeline(write(tmp_path, base + f"train: {{pipeline: {old}}}\n"))
    assert pc.train.init == new and pc.stage_config("train").pipeline == old


@pytest.mark.parametrize("text, needle", [
    ("pipeline: fine\n", "unknown pipeline 'fine'; valid: ft, e2e (deprecated: use init: teacher | random)"),
    ("init: ft\n", "unknown init 'ft'; valid: teacher, random"),
    ("init: runs/x.pt\n", "now `student: PATH`"),
    ("pipeline: ft\ninit: teacher\n", "pipeline and init are both given"),
])
def test_init_takes_teacher_or_random(tmp_path, text, needle):
    with pytest.raises(ValueError) as err:
        load_config(write(tmp_path, "teacher: t.th\n" + text))
    assert needle in str(err.value)


def test_the_pipeline_train_section_takes_the_training_schema_names(tmp_path):
    """train.rule / train.rule_params (an earlier release) are read as train.algorithm.rule / .params, with a
    DeprecationWarning naming the new key; both spellings at once are refused."""
    from pipelines.config import load_pipeline

    base = "data: {train: a, test: b}\nteacher: {source: file, path: t.th}\n"
    rho = "{rho: {kind: linear, start: 0.1, end: 5}}"
    with pytest.warns(DeprecationWarning, match=r"train.rule is deprecated: use train.algorithm.rule: pq"):
        old = load_pipeline(write(tmp_path, base + f"train: {{rule: pq, rule_params: {rho}}}\n"))
    new = load_pipeline(write(tmp_path, base + f"train: {{algorithm: {{rule: pq, params: {rho}}}}}\n"))
    assert old == new and new.train.algorithm.params["rho"]["end"] == 5
    assert new.stage_config("train").algorithm == new.train.algorithm  # the train stage's TrainConfig
    with pytest.raises(ValueError, match="train.rule and train.algorithm.rule are both given"):
        load_pipeline(write(tmp_path, base + "train: {rule: pq, algorithm: {rule: rpc}}\n"))


# -- paths from the working directory (issue 13, item 3) ------------------------------------------------
def test_relative_paths_are_taken_from_the_working_directory_never_the_repo(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    elsewhere = tmp_path / "elsewhere" / "test"  # an absolute path: kept as it is
    path = write(sub, "init: teacher\nteacher: Makefile\nstudent: ~/x.pt\n"
                      f"data: {{train: shards/train, test: {elsewhere}}}\n"
                      "tracking: {run_root: runs, tracking_uri: sqlite:///rel.db}\n"
                      "distributed: {deepspeed: cpu}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    assert cfg.teacher == str(tmp_path / "Makefile")  # not the repository's Makefile, not the config's folder
    assert cfg.student == str(Path("~/x.pt").expanduser())
    assert cfg.data.train == str(tmp_path / "shards" / "train") and cfg.data.test == str(elsewhere)
    assert cfg.tracking.run_root == str(tmp_path / "runs")
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path / 'rel.db'}"
    assert cfg.distributed.deepspeed == "cpu"  # a preset: the file shipped in cluster/deepspeed/
    assert load_config(path, ["distributed.deepspeed=ds.json"]).distributed.deepspeed == str(tmp_path / "ds.json")
    again = load_config(path, [f"data.train={tmp_path}/x"])
    assert again.data.train == str(tmp_path / "x")


def test_relative_mlflow_tracking_uri_in_the_environment_is_made_absolute(tmp_path, monkeypatch):
    from cluster.local import absolute_uri, tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///sub/rel.db")
    assert tracking_uri("runs") == f"sqlite:///{tmp_path / 'sub' / 'rel.db'}"
    assert absolute_uri("./mlruns") == str(tmp_path / "mlruns")
    assert absolute_uri("file:mlruns") == (tmp_path / "mlruns").as_uri()
    for kept in ("sqlite:////abs/x.db", "http://127.0.0.1:5000", "file:///abs/mlruns", "databricks"):
        assert absolute_uri(kept) == kept


def test_the_demo_configs_commented_bwa_variant_is_a_valid_config(tmp_path):
    """demo.yaml's commented BWA lines, uncommented in place of its BW binarize line, load as BWA / BWAA."""
    from pipelines.config import load_pipeline
    lines = (REPO / "pipelines" / "configs" / "demo.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# binarize: {"))
    variant = [lines[start][2:], lines[start + 1][2:]]
    assert variant[1].lstrip().endswith("}")  # the variant is the two commented lines
    body = [line for line in lines if not line.startswith("binarize:")]
    (tmp_path / "bwa.yaml").write_text("\n".join(body + variant) + "\n")
    spec = load_pipeline(tmp_path / "bwa.yaml").binarize
    assert spec.activation == "bnn++" and spec.activation_placement == "auto" and spec.accumulator_bits is None
    (tmp_path / "bwaa.yaml").write_text("\n".join(body + variant[:1] + [variant[1][:-1] + ", accumulator_bits: 8}"])
                                        + "\n")
    assert load_pipeline(tmp_path / "bwaa.yaml").binarize.accumulator_bits == 8


def test_an_error_about_an_overridden_key_names_the_override_not_the_file(tmp_path):
    from stages.config import ConfigError

    path = write(tmp_path, "init: random\noptim: {lr: 0.01, bogus: 2}\n")
    with pytest.raises(ConfigError) as err:  # one from the override, one from the file: each says where
        load_config(path, ["optim.epochs=1.5", "name=ok"])
    override, file = sorted(err.value.errors, key=lambda e: not e.startswith("override"))
    assert override == "override 'optim.epochs=1.5': optim.epochs: expected an integer, got '1.5'"
    assert file.startswith(f"{path}: unknown key optim.bogus; valid keys: ")  # lists epochs: still the file's
    with pytest.raises(ConfigError, match=r"^override 'optim.wat=1': unknown key optim.wat"):
        load_config(write(tmp_path, "init: random\n", "d.yaml"), ["optim.wat=1"])
    with pytest.raises(ConfigError) as err:  # a file's error stays the file's, overrides or not
        load_config(path, ["optim.lr=0.1"])
    assert str(err.value).startswith(f"{path}: unknown key optim.bogus")


def test_a_pipeline_override_is_named_for_its_section_checks_too():
    from pipelines.config import load_pipeline
    from stages.config import ConfigError

    yaml_path = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "frontier_resnet20.yaml"
    with pytest.raises(ConfigError, match=r"^override 'binarize.keep_fp=\{from_sensitivity: -1\}': keep_fp "):
        load_pipeline(yaml_path, ["binarize.keep_fp={from_sensitivity: -1}"])  # the section says keep_fp
    with pytest.raises(ConfigError, match=r"^override 'frontier.foo=1': unknown key frontier.foo"):
        load_pipeline(yaml_path, ["name=x", "frontier.foo=1"])
    with pytest.raises(ConfigError, match=r"^override 'binarize.keep_fp=\{from_sensitivty: 1\}': unknown keep_fp key"):
        load_pipeline(yaml_path, ["binarize.keep_fp={from_sensitivty: 1}"])  # named inside the message
    with pytest.raises(ConfigError, match=r"^override 'frontier.keep=\[-1\]': frontier.keep point K=-1: "):
        load_pipeline(yaml_path, ["frontier.keep=[-1]"])
    with pytest.raises(ConfigError, match=r"^override 'train.optim.lr=fast': train.optim.lr: expected a number"):
        load_pipeline(yaml_path, ["train.optim.lr=fast", "data.train=x"])  # data.train's "train" is not train.


def test_an_override_below_another_section_is_not_blamed_for_that_section(tmp_path):
    from pipelines.config import load_pipeline
    from stages.config import ConfigError

    path = write(tmp_path, "model: {name: resnet20}\nteacher: {source: train}\ntrain: {optim: {lr: fast}}\n")
    with pytest.raises(ConfigError) as err:  # the file's train.optim.lr, not the data.train override's
        load_pipeline(path, ["data.train=x"])
    assert str(err.value).startswith(f"{path}: train.optim.lr: expected a number"), str(err.value)
