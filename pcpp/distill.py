"""Knowledge distillation from the full-precision teacher: logit KL at a temperature (Hinton et al. 2015).

The binarized student is trained against the soft targets of its full-precision teacher, as in BiBERT
(Qin et al. 2022) and the ProxConnect++ experiments.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DistillationLoss", "kd_loss"]


def _check_args(temperature: float, alpha: float) -> None:
    if not (_is_real(temperature) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (_is_real(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 1.0,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, targets).

    KL is averaged over the batch ("batchmean"); T^2 keeps the soft-target gradients on the scale of the
    hard-target ones (Hinton et al. 2015). The teacher logits are treated as constants.
    """
    _check_args(temperature, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} "
            f"vs {tuple(teacher_logits.shape)}"
        )
    if alpha < 1.0 and targets is None:
        raise ValueError(f"alpha={alpha} < 1 mixes in cross-entropy, which needs targets")

    loss = student_logits.new_zeros(())
    if alpha > 0.0:
        log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
        log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        loss = loss + alpha * temperature**2 * kl
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * F.cross_entropy(student_logits, targets)
    return loss


class DistillationLoss(nn.Module):
    """`kd_loss` against a frozen teacher, which always runs in eval mode without gradients."""

    def __init__(self, teacher: nn.Module, *, temperature: float = 4.0, alpha: float = 1.0):
        super().__init__()
        _check_args(temperature, alpha)
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        self.alpha = alpha

    def train(self, mode: bool = True) -> DistillationLoss:
        # model.train() on a parent must not put the teacher's BatchNorm/dropout into training mode
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(
        self, inputs: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        return kd_loss(
            student_logits, teacher_logits, temperature=self.temperature, alpha=self.alpha, targets=targets
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"
