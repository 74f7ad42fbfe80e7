"""pcpp.evaluation: the one honest top-1 evaluation."""

import pytest
import torch
from torch import nn

from pcpp.evaluation import accuracy, evaluate
from pcpp.layers import BinaryLinear

pytestmark = pytest.mark.unit


def test_counts_the_honest_binary_forward_and_restores_flags():
    torch.manual_seed(0)
    layer = BinaryLinear(4, 2, bias=False, weight_quantizer="bnn++")
    model = nn.Sequential(layer)
    x = torch.randn(50, 4)
    w = layer.weight.detach()
    s = w.abs().mean()
    y = (x @ (s * torch.where(w >= 0, 1.0, -1.0)).T).argmax(1)  # labels the honest (sign) network gets right
    model.train()
    assert evaluate(model, [(x[:20], y[:20]), (x[20:], y[20:])]) == (50, 50)
    assert accuracy(model, [(x, y)]) == 1.0
    assert model.training and not layer.honest  # flags restored


def test_empty_loader_is_refused():
    with pytest.raises(ValueError, match="no samples"):
        accuracy(nn.Linear(2, 2), [])


@pytest.mark.parametrize("honest", [True, False])
def test_an_evaluation_leaves_the_bwaa_overflow_counters_as_training_left_them(honest):
    """BWAA's overflow rate is the training steps' (an epoch's metric): the test-set forwards of an evaluation,
    honest or on the training forward, do not count."""
    torch.manual_seed(0)
    layer = BinaryLinear(256, 8, weight_quantizer="bc", act_quantizer="bnn", accumulator_bits=8,
                         activation_placement="none")
    with torch.no_grad():
        layer.weight.add_(layer.weight.abs().mean())  # mostly +1 signs: sums of 256 pass 127
    model = nn.Sequential(layer)
    x = torch.rand(16, 256) - 0.1
    model.train()
    model(x).sum().backward()  # one training step's forward
    counted = (int(layer.overflow_count), int(layer.accumulator_count))
    assert counted[0] > 0 and counted[1] == 16 * 8
    loader = [(torch.rand(32, 256) - 0.1, torch.zeros(32, dtype=torch.long))] * 3
    assert evaluate(model, loader, honest=honest)[1] == 96
    assert (int(layer.overflow_count), int(layer.accumulator_count)) == counted
