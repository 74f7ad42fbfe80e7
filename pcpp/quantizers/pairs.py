"""The registered forward/backward pairs: paper Table 1 (fp .. bnn++) and Appendix F (poly .. react).

Each class is one pair: its docstring names F, B and the source; its two static functions are the
pair. Default schedules follow section 4.1 (rho 0.01 -> 10 linear, mu = 5 for BNN+) and the original papers
for R-BNN / IR-Net (t log-linear, k = max(1/t, 1)), except BNN++'s mu: log-linear 1.25 -> 30.4 instead of the
paper's linear 5 -> 30 (see BNNPlusPlus). These are the weights' defaults; where a pair binarizes activations,
pcpp.specs.ACTIVATION_SCHEDULES overrides some (bnn++: mu log-linear 0.5 -> 10; bnn+: mu 2).
"""

from __future__ import annotations

import torch
from torch import nn

from pcpp.prox import prox_linear
from pcpp.quantizers import functions as fn
from pcpp.quantizers.base import Quantizer, register
from pcpp.schedules import constant, linear, loglinear


def _k_from_t(p: dict) -> float:
    return max(1.0 / p["t"], 1.0)


@register
class FullPrecision(Quantizer):
    """FP: F = identity, B = 1 (full-precision training)."""

    name = "fp"
    forward_formula = "w"
    backward_formula = "1"
    source = "Table 1 (FP)"

    @staticmethod
    def forward_fn(w):
        return w

    @staticmethod
    def backward_fn(w):
        return torch.ones_like(w)

    def binarize(self, w):
        return w


@register
class BinaryConnect(Quantizer):
    """BC: F = sign (P_Q), B = 1 (identity straight-through). Courbariaux et al. 2015; eq. (2)."""

    name = "bc"
    forward_formula = "sign(w)"
    backward_formula = "1"
    source = "Table 1 (BC), eq. (2)"

    @staticmethod
    def forward_fn(w):
        return fn.sign(w)

    @staticmethod
    def backward_fn(w):
        return torch.ones_like(w)


@register
class ProxConnect(Quantizer):
    """PC: F = L_rho^varrho (piecewise-linear proximal map), B = 1. Dockhorn et al. 2021; App. A eq. (10).

    Default rho: the paper's linear 0.01 -> 10 (section 4.1), kept after the `pcpp sweep` study
    pipelines/configs/sweep_pc_rho_short.yaml (10 trials at a CPU budget, docs/results/sweep_pc_rho_short.md):
    at that budget it scored 81.20% honest against the best trial's 80.95%.
    """

    name = "pc"
    forward_formula = "L_rho(w)"
    backward_formula = "1"
    source = "Table 1 (PC), Appendix A eq. (10)"
    schedules = {"rho": linear(0.01, 10.0), "varrho": constant(0.0)}

    @staticmethod
    def forward_fn(w, rho, varrho):
        return prox_linear(w, rho, varrho)

    @staticmethod
    def backward_fn(w, rho, varrho):
        return torch.ones_like(w)


@register
class BNN(Quantizer):
    """BNN: F = sign, B = 1[|w| <= 1] (hard-tanh STE). Hubara et al. 2016; paper Example 1."""

    name = "bnn"
    forward_formula = "sign(w)"
    backward_formula = "1[|w| <= 1]"
    source = "Table 1 (BNN), Example 1"

    @staticmethod
    def forward_fn(w):
        return fn.sign(w)

    @staticmethod
    def backward_fn(w):
        return fn.indicator(w.abs() <= 1.0, w)


@register
class BNNPlus(Quantizer):
    """BNN+: F = sign, B = SS'_mu (sign-Swish derivative). Darabi et al. 2018; paper Example 2.

    mu is the paper's constant 5 on weights; on activations it defaults to 2 (pcpp.specs.ACTIVATION_SCHEDULES:
    SS'_5 is negative beyond |x| = 0.48; docs/results/sweep_bnnp_act_mu.md)."""

    name = "bnn+"
    forward_formula = "sign(w)"
    backward_formula = "SS'_mu(w)"
    source = "Table 1 (BNN+), Example 2"
    schedules = {"mu": constant(5.0)}

    @staticmethod
    def forward_fn(w, mu):
        return fn.sign(w)

    @staticmethod
    def backward_fn(w, mu):
        return fn.sign_swish_grad(w, mu)


@register
class BNNPlusPlus(Quantizer):
    """BNN++: F = SS_mu, B = SS'_mu; mu ramps up so F -> sign. The paper's Example 3.

    Default mu: log-linear 1.25 -> 30.4 (scaled units), not the paper's linear 5 -> 30 (section 4.1): the best
    honest schedule of the `pcpp sweep` study pipelines/configs/sweep_bnnpp_mu.yaml (Optuna TPE over kind,
    start, end and units; ResNet-20 fine-tuned from the teacher on full CIFAR-10, Adam 2e-3, 3 epochs, ASHA):
    84.22% honest with the training forward 0.05 below it, level with BNN's 84.19% in the same recipe
    (docs/results/sweep_bnnpp_mu.md has every trial). pcpp applies a weight pair in units of the layer scale
    s (w*/s, mean |w*/s| = 1; `units="scaled"`), where SS_5 is already within 5% of sign for |w*/s| > 0.7, so
    the paper's mu 5 binarizes at once and SS'_5 is negative for |w*/s| > 0.48 (most weights stop learning:
    75.8% at 1 epoch, gap 2.8). The sweep says why this shape: a low end (2.6 -> 6.2) learns but never
    binarizes (soft fraction 0.65, forward 1.46 above honest), a high end (2.1 -> 94) binarizes by epoch 2
    and stops learning (83.31%), and raw units left the binary net 35 points below the forward after epoch 1.
    """

    name = "bnn++"
    forward_formula = "SS_mu(w)"
    backward_formula = "SS'_mu(w)"
    source = "Table 1 (BNN++), Example 3"
    schedules = {"mu": loglinear(1.25, 30.4)}

    @staticmethod
    def forward_fn(w, mu):
        return fn.sign_swish(w, mu)

    @staticmethod
    def backward_fn(w, mu):
        return fn.sign_swish_grad(w, mu)


@register
class BiReal(Quantizer):
    """Bi-Real (poly): F = sign, B = (2 - 2|w|) 1[|w| <= 1]. Liu et al. 2018; Appendix F."""

    name = "poly"
    forward_formula = "sign(w)"
    backward_formula = "(2 - 2|w|) 1[|w| <= 1]"
    source = "Appendix F (Bi-Real Net)"

    @staticmethod
    def forward_fn(w):
        return fn.sign(w)

    @staticmethod
    def backward_fn(w):
        return fn.bireal_poly_grad(w)


@register
class BiRealPlus(Quantizer):
    """Poly+: F = p(k w), B = k p'(k w), p the Bi-Real polynomial; k ramps 1 -> 30 so F -> sign.

    The legitimate (Corollary 2) variant of Bi-Real, Appendix F.
    """

    name = "poly+"
    forward_formula = "p(k w)"
    backward_formula = "k p'(k w)"
    source = "Appendix F (Poly+)"
    schedules = {"k": linear(1.0, 30.0)}

    @staticmethod
    def forward_fn(w, k):
        return fn.bireal_poly(k * w)

    @staticmethod
    def backward_fn(w, k):
        return k * fn.bireal_poly_grad(k * w)


@register
class RBNN(Quantizer):
    """R-BNN: F = sign, B = k max(0, sqrt(2) t - t^2 |w|); t = 10^(-2 + 3p), k = max(1/t, 1).

    Lin et al. 2020 (training-aware sign approximation); Appendix F.
    """

    name = "rbnn"
    forward_formula = "sign(w)"
    backward_formula = "k max(0, sqrt2 t - t^2 |w|)"
    source = "Appendix F (R-BNN)"
    schedules = {"t": loglinear(0.01, 10.0)}
    derived = {"k": _k_from_t}

    @staticmethod
    def forward_fn(w, t, k):
        return fn.sign(w)

    @staticmethod
    def backward_fn(w, t, k):
        return fn.rbnn_grad(w, t, k)


@register
class EDE(Quantizer):
    """EDE (IR-Net): F = sign, B = k t (1 - tanh^2(t w)); t = 10^(-1 + 2p), k = max(1/t, 1).

    Qin et al. 2020; Appendix F.
    """

    name = "ede"
    forward_formula = "sign(w)"
    backward_formula = "k t (1 - tanh^2(t w))"
    source = "Appendix F (EDE, IR-Net)"
    schedules = {"t": loglinear(0.1, 10.0)}
    derived = {"k": _k_from_t}

    @staticmethod
    def forward_fn(w, t, k):
        return fn.sign(w)

    @staticmethod
    def backward_fn(w, t, k):
        return fn.ede_grad(w, t, k)


@register
class EDEPlus(Quantizer):
    """EDE+: F = k tanh(t w), B = k t (1 - tanh^2(t w)): the Corollary 2 variant of EDE (Appendix F)."""

    name = "ede+"
    forward_formula = "k tanh(t w)"
    backward_formula = "k t (1 - tanh^2(t w))"
    source = "Appendix F (EDE+)"
    schedules = {"t": loglinear(0.1, 10.0)}
    derived = {"k": _k_from_t}

    @staticmethod
    def forward_fn(w, t, k):
        return k * fn.tanh(t * w)

    @staticmethod
    def backward_fn(w, t, k):
        return fn.ede_grad(w, t, k)


@register
class ReAct(Quantizer):
    """ReAct: F = sign(w - beta), B = 1[|w - beta| <= 1]. Liu et al. 2020 (RSign); Appendix F.

    beta is a fixed parameter (0 for weights) unless `learnable_beta=True`, which makes it an
    nn.Parameter (one per channel with `channels=C`, broadcast along dim 1, as ReActNet's RSign) when
    the pair is used on its own. As the activation pair of a binarized layer (pcpp.layers), a learnable beta
    is the layer's `act_threshold` instead, sized from the layer's input channels (dim -3 of a conv
    input, the last dim of a Linear input); a `channels` that disagrees with a layer is refused.
    """

    name = "react"
    forward_formula = "sign(w - beta)"
    backward_formula = "1[|w - beta| <= 1]"
    source = "Appendix F (ReActNet)"
    schedules = {"beta": constant(0.0)}
    options = {"learnable_beta": False, "channels": None}

    def __init__(self, **params):
        super().__init__(**params)
        channels = self.opts["channels"]
        if channels is not None and (not isinstance(channels, int) or channels < 1):
            raise ValueError(f"react: channels must be a positive int or None, got {channels!r}")
        if self.opts["learnable_beta"]:
            init = self.param_schedules["beta"](0.0)
            self.beta = nn.Parameter(torch.full((channels or 1,), init))
        else:
            self.beta = None

    @staticmethod
    def forward_fn(w, beta):
        return fn.sign(w - beta)

    @staticmethod
    def backward_fn(w, beta):
        return fn.indicator((w - beta).abs() <= 1.0, w)

    def _shift(self, w: torch.Tensor) -> torch.Tensor:
        if self.beta.numel() == 1:
            return self.beta.reshape(())
        shape = [1] * w.dim()
        shape[1] = -1
        return self.beta.reshape(shape)

    def binarize(self, w):
        shift = self.param_schedules["beta"](self.progress) if self.beta is None else self._shift(w).detach()
        return fn.sign(w - shift)

    def F(self, w):
        if self.beta is None:
            return super().F(w)
        return self.forward_fn(w, self._shift(w).detach())

    def B(self, w):
        if self.beta is None:
            return super().B(w)
        return self.backward_fn(w, self._shift(w).detach())

    def forward(self, w):
        if self.beta is None:
            return super().forward(w)
        # The shift is a tensor, so the gradient reaches beta: d/dbeta = -grad * B(w - beta).
        return self.apply_pair(w, shift=self._shift(w), params={"beta": 0.0})
