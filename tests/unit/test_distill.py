"""Knowledge-distillation loss: zero at equal logits, hand-computed values, gradients, validation."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pcpp.distill import DistillationLoss, kd_loss

pytestmark = pytest.mark.unit


def test_zero_when_logits_equal():
    logits = torch.randn(4, 10)
    assert kd_loss(logits, logits.clone()).abs().item() < 1e-6


def test_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    T = 2.0
    expected = 0.0
    for si, ti in zip(s.tolist(), t.tolist()):
        ps = [math.exp(x / T) for x in si]
        pt = [math.exp(x / T) for x in ti]
        ps = [p / sum(ps) for p in ps]
        pt = [p / sum(pt) for p in pt]
        expected += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    expected = T**2 * expected / len(s)
    assert kd_loss(s, t, temperature=T).item() == pytest.approx(expected, rel=1e-5)


def test_mixes_cross_entropy():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    y = torch.randint(0, 4, (5,))
    kd = kd_loss(s, t, temperature=3.0)
    ce = F.cross_entropy(s, y)
    mixed = kd_loss(s, t, temperature=3.0, alpha=0.25, targets=y)
    assert mixed.item() == pytest.approx(0.25 * kd.item() + 0.75 * ce.item(), rel=1e-5)
    assert kd_loss(s, t, alpha=0.0, targets=y).item() == pytest.approx(ce.item(), rel=1e-6)
    # alpha = 1 ignores targets
    assert torch.equal(kd_loss(s, t, targets=y), kd_loss(s, t))


def test_gradient_reaches_student_only():
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5, requires_grad=True)
    kd_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_distillation_loss_freezes_teacher():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    student = nn.Linear(6, 4)
    loss_fn = DistillationLoss(teacher, temperature=2.0)
    loss_fn.train()
    assert not teacher.training
    running_mean = teacher[1].running_mean.clone()

    x = torch.randn(16, 6)
    loss = loss_fn(x, student(x))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert torch.equal(teacher[1].running_mean, running_mean)
    with torch.no_grad():
        expected = kd_loss(student(x), teacher(x), temperature=2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha=0.5), "targets"),
    ],
)
def test_validation(kwargs, match):
    s = torch.randn(2, 3)
    with pytest.raises(ValueError, match=match):
        kd_loss(s, s, **kwargs)


def test_validation_shape_and_module_args():
    with pytest.raises(ValueError, match="shape"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(nn.Linear(2, 2), temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(nn.Linear(2, 2), alpha=2)
    with pytest.raises(ValueError, match="targets"):
        DistillationLoss(nn.Linear(2, 2), alpha=0.5)(torch.randn(1, 2), torch.randn(1, 2))
