"""Pure elementwise tensor functions the quantizer pairs are built from.

Every function takes a tensor and plain floats and returns a tensor of the same shape and dtype; no
autograd is involved (the pairs' backward factors are given explicitly, eq. (7) of the paper).
sign(0) = +1 throughout. The proximal map L_rho of PC is in pcpp.prox (`prox_linear` stays importable here).
"""

from __future__ import annotations

import math

import torch

from pcpp.prox import prox_linear  # noqa: F401  (the L_rho map lives in pcpp.prox; this name stays importable)

SQRT2 = math.sqrt(2.0)


def sign(w: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1 (torch.sign gives 0 there, which is not in Q = {-1, +1})."""
    return torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))


def indicator(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(like.dtype)


def sign_swish(w: torch.Tensor, mu: float) -> torch.Tensor:
    """SS_mu(w) = (mu w / 2) sech^2(mu w / 2) + tanh(mu w / 2) (BNN+, Darabi et al.; paper Example 3)."""
    x = 0.5 * mu * w
    t = torch.tanh(x)
    return x * (1.0 - t * t) + t


def sign_swish_grad(w: torch.Tensor, mu: float) -> torch.Tensor:
    """SS'_mu(w) = mu [1 - (mu w / 2) tanh(mu w / 2)] sech^2(mu w / 2) (paper Example 2)."""
    x = 0.5 * mu * w
    t = torch.tanh(x)
    return mu * (1.0 - x * t) * (1.0 - t * t)


def bireal_poly(x: torch.Tensor) -> torch.Tensor:
    """Bi-Real Net's piecewise polynomial: -1 | 2x + x^2 | 2x - x^2 | +1 on (-inf,-1,0,1,inf)."""
    a = x.clamp(-1.0, 1.0)
    return 2.0 * a - a * a.abs()


def bireal_poly_grad(x: torch.Tensor) -> torch.Tensor:
    """p'(x) = (2 - 2|x|) 1[|x| <= 1]."""
    return (2.0 - 2.0 * x.abs()).clamp_min(0.0)


def rbnn_grad(w: torch.Tensor, t: float, k: float) -> torch.Tensor:
    """R-BNN's training-aware sign gradient k max(0, sqrt(2) t - t^2 |w|) (Lin et al. 2020)."""
    return k * (SQRT2 * t - t * t * w.abs()).clamp_min(0.0)


def ede_grad(w: torch.Tensor, t: float, k: float) -> torch.Tensor:
    """IR-Net's error decay estimator k t (1 - tanh^2(t w)) (Qin et al. 2020)."""
    th = torch.tanh(t * w)
    return k * t * (1.0 - th * th)
