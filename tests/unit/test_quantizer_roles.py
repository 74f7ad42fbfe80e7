"""A pair's default schedules depend on what it binarizes: bnn++ on activations ramps mu to 10, not 30.4, and
bnn+ on activations keeps mu at 2, not 5 (pcpp.specs.ACTIVATION_SCHEDULES); everything a user sets wins."""

import pytest
import torch

from pcpp import models, quantizers, tasks
from pcpp.layers import BinaryConv2d, binary_layers
from pcpp.schedules import constant, loglinear
from pcpp.specs import ACTIVATION_SCHEDULES, default_schedules, make_quantizer
from pcpp.surgery import binarize_
from pipelines.cli import main

pytestmark = pytest.mark.unit


def test_bnn_pp_defaults_per_role():
    assert make_quantizer("bnn++").param_schedules["mu"] == loglinear(1.25, 30.4)
    assert make_quantizer("bnn++", "activation").param_schedules["mu"] == loglinear(0.5, 10.0)
    assert default_schedules("bnn++", "activation") == {"mu": loglinear(0.5, 10.0)}
    # at the end of training the activation pair sits at mu 10, the weight pair at 30.4
    assert make_quantizer("bnn++", "activation").set_progress(1.0).params["mu"] == pytest.approx(10.0)
    assert make_quantizer("bnn++").set_progress(1.0).params["mu"] == pytest.approx(30.4)


def test_bnn_plus_activations_default_to_mu_2_its_weights_keep_the_papers_5():
    assert make_quantizer("bnn+").param_schedules["mu"] == constant(5.0)
    assert make_quantizer("bnn+", "activation").param_schedules["mu"] == constant(2.0)
    assert make_quantizer({"name": "bnn+", "mu": 5.0}, "activation").params["mu"] == 5.0  # the paper's, when set


def test_pairs_without_an_activation_default_are_the_same_in_both_roles():
    for name in quantizers.names():
        if name not in ACTIVATION_SCHEDULES:
            assert default_schedules(name, "activation") == default_schedules(name), name


def test_what_the_user_sets_wins_over_the_role_default():
    mine = {"kind": "linear", "start": 1.0, "end": 3.0}
    q = make_quantizer({"name": "bnn++", "mu": mine}, "activation")
    assert q.param_schedules["mu"].to_dict() == mine
    given = quantizers.get("bnn++", mu=7.0)
    assert make_quantizer(given, "activation").params["mu"] == 7.0  # an instance is copied as is


def test_unknown_role_is_refused():
    with pytest.raises(ValueError, match="unknown quantizer role 'bias'; valid: weight, activation"):
        make_quantizer("bnn", "bias")


def test_layers_and_surgery_use_the_activation_default():
    layer = BinaryConv2d(3, 4, 3, weight_quantizer="bnn++", act_quantizer="bnn++")
    assert layer.weight_quantizer.param_schedules["mu"] == loglinear(1.25, 30.4)
    assert layer.act_quantizer.param_schedules["mu"] == loglinear(0.5, 10.0)
    model = models.create("resnet20")
    binarize_(model, tasks.spec("BWA", "bnn++", "bnn++"))
    acts = [m.act_quantizer for _, m in binary_layers(model)]
    assert acts and all(q.param_schedules["mu"] == loglinear(0.5, 10.0) for q in acts)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)


def test_the_cli_shows_the_activation_default(capsys):
    assert main(["quantizers"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("bnn++ "))
    assert "loglinear 1.25 -> 30.4" in row and "loglinear 0.5 -> 10" in row
