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
