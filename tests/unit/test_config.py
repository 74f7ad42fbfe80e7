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
    ({"pipeline": "ft"}, "teacher"),
])
def test_bad_config_is_refused_with_the_valid_values(data, needle):
    base = {"pipeline": "e2e"}
    base.update(data)
    with pytest.raises(ValueError) as err:
        build(TrainConfig, base)
    assert needle in str(err.value)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ValueError, match="mapping"):
        load_config(tmp_path / "list.yaml")
