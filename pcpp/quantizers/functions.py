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


# tanh's Taylor series at 0 up to x^9 (the x^11 term is 2e-10 of tanh below |x| = 0.2)
_TANH_SERIES = (-1.0 / 3.0, 2.0 / 15.0, -17.0 / 315.0, 62.0 / 2835.0)
_TANH_SERIES_BELOW = 0.2


def tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh(x): torch.tanh, except inside a torch.compile trace of a float32 CPU tensor (pcpp.kernels' fused
    kernels), where it is `tanh_by_exp`: Inductor's vectorized CPU tanh costs twice its exp, and bnn++'s fused
    pair on a 128x16x32x32 activation (2 threads) takes 1.14 ms instead of 1.98 ms. Eager code (the reference
    path, small tensors, a failed compile) keeps torch.tanh's values and its one pass; Triton's tanh (GPU) is
    not slow."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and torch.compiler.is_compiling():
        return tanh_by_exp(x)
    return torch.tanh(x)


def tanh_by_exp(x: torch.Tensor) -> torch.Tensor:
    """tanh(x) as sign(x) (1 - e) / (1 + e), e = exp(-2|x|), and tanh's Taylor series below |x| = 0.2 (where
    1 - e would cancel): within 2e-7 relative (1.5 ulp) of the exact value in float32, against torch.tanh's
    6e-8. +-0, +-inf and NaN map as torch.tanh maps them. Meant for float32 (half types would round 1 - e
    coarsely, float64 would lose its precision to the series' 2e-10)."""
    a = x.abs()
    e = torch.exp(-2.0 * a)
    z = a * a
    c3, c5, c7, c9 = _TANH_SERIES
    series = a * (1.0 + z * (c3 + z * (c5 + z * (c7 + z * c9))))
    return torch.copysign(torch.where(a < _TANH_SERIES_BELOW, series, (1.0 - e) / (1.0 + e)), x)


def sign_swish(w: torch.Tensor, mu: float) -> torch.Tensor:
    """SS_mu(w) = (mu w / 2) sech^2(mu w / 2) + tanh(mu w / 2) (BNN+, Darabi et al.; paper Example 3)."""
    x = 0.5 * mu * w
    t = tanh(x)
    return x * (1.0 - t * t) + t


def sign_swish_grad(w: torch.Tensor, mu: float) -> torch.Tensor:
    """SS'_mu(w) = mu [1 - (mu w / 2) tanh(mu w / 2)] sech^2(mu w / 2) (paper Example 2)."""
    x = 0.5 * mu * w
    t = tanh(x)
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
    th = tanh(t * w)
    return k * t * (1.0 - th * th)
