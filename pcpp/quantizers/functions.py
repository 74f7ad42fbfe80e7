"""Pure elementwise tensor functions the quantizer pairs are built from.

Every function takes a tensor and plain floats and returns a tensor of the same shape and dtype; no
autograd is involved (the pairs' backward factors are given explicitly, eq. (7) of the paper).
sign(0) = +1 throughout.
"""

from __future__ import annotations

import math

import torch

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


def prox_linear(w: torch.Tensor, rho: float, varrho: float = 0.0) -> torch.Tensor:
    """L_rho^varrho for Q = {-1, +1} (paper Appendix A, eq. (10); DESIGN.md gives the intended map).

    q1+ = min(0, -1 + rho), q2- = max(0, 1 - rho), p- = max(-1, -varrho), p+ = min(1, varrho).
    -1 up to q1+, a line to (0, p-), a jump at 0 to p+, a line to (q2-, +1), then +1.
    rho >= 1 gives sign; rho -> 0 with varrho = 0 approaches the identity on [-1, 1].
    """
    if not (rho >= 0 and varrho >= 0):
        raise ValueError(f"L_rho needs rho >= 0 and varrho >= 0, got rho={rho}, varrho={varrho}")
    q1p = min(0.0, -1.0 + rho)
    q2m = max(0.0, 1.0 - rho)
    pm = max(-1.0, -varrho)
    pp = min(1.0, varrho)
    neg = torch.full_like(w, -1.0)
    pos = torch.ones_like(w)
    if q1p < 0.0:
        neg = torch.where(w > q1p, -1.0 + (w - q1p) * ((pm + 1.0) / (0.0 - q1p)), neg)
    if q2m > 0.0:
        pos = torch.where(w < q2m, pp + w * ((1.0 - pp) / q2m), pos)
    return torch.where(w >= 0, pos, neg)
