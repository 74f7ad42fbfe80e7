"""Binarized layers: BinaryConv2d and BinaryLinear (BW, BWA, BWAA of the paper's section 4; pcpp.tasks).

Formerly pcpp.nn (a name that shadowed torch.nn; pcpp.nn still re-exports this module for one release).

They subclass nn.Conv2d / nn.Linear and keep the parameter names, so full-precision state dicts load
as-is; the latent weight w* is `self.weight` and is transformed inside `forward` (timm's StdConv2d way).

Scale convention (docs/contracts.md): with a scale s (mean |w*| per layer, the paper's protocol 1, or per
output channel), a weight pair acts in units of s: output s F(w*/s), gradient B(w*/s). `units="raw"`
applies the pair to w* itself and multiplies by s afterwards. Activation pairs act on raw activations.

Activation thresholds (docs/contracts.md, "Binarized layers and surgery"; ReActNet's RSign): with
`activation_placement="threshold"` a BWA/BWAA layer owns `act_threshold`, a learnable beta of one entry
per channel of its input (dim -3 of a conv input, the last dim of a Linear input), and the activation
pair acts on x - beta: forward F(x - beta), gradient B(x - beta) to x and -B(x - beta) to beta.
`pcpp.calibration` sets beta to the per-channel median for fine-tuning; it starts at 0 otherwise.

Honest (binarized-eval) mode, `binary_eval(model)`: weights s sign(w*), activations sign(x - beta),
accumulators wrapped. Every reported binary accuracy is measured in that mode.

BWAA (WrapNet, Ni et al. 2020): the dot products of +-1 operands, integers, wrap to `accumulator_bits`
two's complement; the gradient passes straight through the wrap. Layers count the overflow rate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pcpp.accumulators import WrapSTE, wrap_integer, wrap_scale  # noqa: F401  (WrapSTE, wrap_integer: public here too)
from pcpp.quantizers import Quantizer
from pcpp.specs import activation_pair, make_quantizer  # noqa: F401  (make_quantizer: public here too)

SCALINGS = ("none", "layer", "channel")
UNITS = ("scaled", "raw")
ACCUMULATOR_BITS = (None, 8)
# Where a binarized activation gets its signed input (docs/contracts.md): a learnable per-channel threshold, the
# model's block layout (pcpp.placement: hardtanh in place of the ReLU, or the sign before the ReLU), or
# nothing ("none": sign(x) of the raw input, for inputs that are signed already).
PLACEMENTS = ("threshold", "hardtanh", "pre_relu", "none")


def tiny(dtype: torch.dtype) -> float:
    """The smallest positive normal number of a floating dtype: the floor of a divisor in that dtype.

    A fixed 1e-8 underflows to 0 in float16 (smallest normal 6.1e-5), so a dead channel's scale became 0
    and w / s NaN; finfo(dtype).tiny is representable in every dtype and keeps w / s finite.
    """
    return torch.finfo(dtype).tiny


def _choice(what: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")


class BinaryMixin:
    """Shared machinery of the binarized layers; `_op(x, w, bias)` is the torch op of the twin.

    Subclasses define `input_channels` (channels of the input, what a threshold is sized by) and
    `_input_view(v)` (a per-input-channel vector shaped to broadcast against the input).
    """

    def _init_binary(self, weight_quantizer="bnn++", act_quantizer=None, scaling="layer", units="scaled",
                     accumulator_bits=None, activation_placement="threshold", act_threshold=None):
        _choice("scaling", scaling, SCALINGS)
        _choice("units", units, UNITS)
        _choice("accumulator_bits", accumulator_bits, ACCUMULATOR_BITS)
        _choice("activation_placement", activation_placement, PLACEMENTS)
        self.weight_quantizer = make_quantizer(weight_quantizer)
        if self.weight_quantizer is None:
            raise ValueError("a binarized layer needs a weight quantizer (use 'fp' for full precision)")
        self.act_quantizer, beta0 = activation_pair(act_quantizer, self.input_channels)
        if accumulator_bits is not None and self.act_quantizer is None:
            raise ValueError("accumulator_bits needs an activation quantizer: BWAA binarizes weights, "
                             "activations and accumulators (use act_quantizer='bnn++' or another pair)")
        if act_threshold is None:
            act_threshold = self.act_quantizer is not None and (activation_placement == "threshold"
                                                               or beta0 is not None)
        if act_threshold and self.act_quantizer is None:
            raise ValueError("act_threshold=True needs an activation quantizer (BWA / BWAA)")
        self.scaling = scaling
        self.units = units
        self.accumulator_bits = accumulator_bits
        self.activation_placement = activation_placement
        self.honest = False
        self.latent_forward = False  # set by pq / rpc / ptb: the training forward uses w* itself
        w = self.weight
        self.act_threshold = nn.Parameter(torch.full((self.input_channels,), beta0 or 0.0, device=w.device,
                                                     dtype=w.dtype)) if act_threshold else None
        self.register_buffer("frozen_scale", None)
        # int64 counters: .half() casts floating buffers, and float16 counts saturate at 65504.
        self.register_buffer("overflow_count", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("accumulator_count", torch.zeros((), dtype=torch.int64), persistent=False)

    # -- weights ---------------------------------------------------------------------------------
    def weight_scale(self) -> torch.Tensor:
        """s, broadcastable to the weight and detached: 1, mean |w*|, or mean |w*| per output channel."""
        w = self.weight
        if self.frozen_scale is not None:
            return self.frozen_scale
        if self.scaling == "none":
            return torch.ones((), dtype=w.dtype, device=w.device)
        if self.scaling == "layer":
            return w.detach().abs().mean().clamp_min(tiny(w.dtype))
        dims = tuple(range(1, w.dim()))
        return w.detach().abs().mean(dim=dims, keepdim=True).clamp_min(tiny(w.dtype))

    def unit_weight(self) -> torch.Tensor:
        """The weight in units of s (+-1 when binary), with the pair's autograd in training."""
        s = self.weight_scale()
        w = self.weight
        if self.honest:
            return self.weight_quantizer.binarize(w / s)
        if self.latent_forward:
            return w / s
        if self.units == "scaled":
            return self.weight_quantizer.apply_pair(w, scale=s)
        return self.weight_quantizer(w)

    def effective_weight(self) -> torch.Tensor:
        """What the op sees: s times the unit weight (in training, one fused pair: s F(w*/s) or s F(w*))."""
        if self.honest or self.latent_forward:
            return self.weight_scale() * self.unit_weight()
        s = self.weight_scale()
        return self.weight_quantizer.apply_pair(self.weight, scale=s if self.units == "scaled" else None,
                                                out_scale=s)

    def soft_fraction(self) -> float:
        """Share of weights whose training-forward value lies more than 1% of s away from +-s."""
        with torch.no_grad():
            u = self.unit_weight()
            return float(((u.abs() - 1.0).abs() > 0.01).double().mean())

    # -- activations -------------------------------------------------------------------------------
    def shift_input(self, x: torch.Tensor) -> torch.Tensor:
        """x - beta along the input channels (x itself without a threshold); what the pair binarizes."""
        if self.act_threshold is None:
            return x
        return x - self._input_view(self.act_threshold)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The activation pair on x - beta: F in training, the honest sign under binary_eval."""
        q = self.act_quantizer
        if q is None:
            return x
        if self.honest:
            return q.binarize(self.shift_input(x))
        shift = None if self.act_threshold is None else self._input_view(self.act_threshold)
        return q(x) if shift is None else q.apply_pair(x, shift=shift)

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        if self.accumulator_bits is None:
            return self._op(x, self.effective_weight(), self.bias)
        # The integer dot products in float32: float16 holds integers exactly only up to 2048 and bfloat16
        # up to 256, past which the wrap would act on rounded sums.
        dtype, exact = x.dtype, torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            acc = self._op(x.to(exact), self.unit_weight().to(exact), None)
        # One pass: wrap, scale (after the wrap: the integers wrap, not s times them), cast, bias, overflow count.
        bias = None if self.bias is None else self._channel_view(self.bias, acc)
        out, overflow = wrap_scale(acc, self._channel_view(self.weight_scale().to(exact), acc), bias,
                                   self.accumulator_bits, dtype)
        with torch.no_grad():
            self.overflow_count += overflow
            self.accumulator_count += acc.numel()
        return out

    def _channel_view(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Put a per-output-channel vector where the op's output keeps its channels."""
        if v.numel() == 1:
            return v.reshape(())
        if isinstance(self, nn.Conv2d):  # N, C, H, W
            return v.reshape(1, -1, 1, 1)
        return v.reshape(-1)  # linear: channels last

    @property
    def overflow_rate(self) -> float:
        n = float(self.accumulator_count)
        return float(self.overflow_count) / n if n else 0.0

    def reset_overflow(self) -> None:
        self.overflow_count.zero_()
        self.accumulator_count.zero_()

    def binary_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(signs in {-1, +1}, scale s) of the honest binarized weight, s * binarize(w* / s).

        Raises ValueError when the weight pair has no binary honest value (fp).
        """
        with torch.no_grad():
            s = self.weight_scale()
            signs = self.weight_quantizer.binarize(self.weight / s)
            if not bool((signs.abs() == 1).all()):
                raise ValueError(f"weight pair {self.weight_quantizer.name!r} is not binary (its honest value is "
                                 "not +-1): nothing to pack into 1-bit weights")
            return signs, s.expand(self._scale_shape()).clone()

    def _scale_shape(self) -> tuple[int, ...]:
        if self.scaling == "channel":
            return (self.weight.shape[0],) + (1,) * (self.weight.dim() - 1)
        return ()

    def _fill_twin(self, twin: nn.Module, binarized: bool) -> nn.Module:
        """Copy the latent parameters into the torch twin, or the honest s sign(w*) with binarized=True."""
        _copy_params(twin, self)
        if binarized:
            signs, s = self.binary_weight()
            with torch.no_grad():
                twin.weight.copy_(signs * s)
        return twin

    def binary_config(self) -> dict:
        """The layer's binarization settings, serialisable (export manifest, MLflow params)."""
        return {
            "weight_quantizer": self.weight_quantizer.state(),
            "act_quantizer": None if self.act_quantizer is None else self.act_quantizer.state(),
            "scaling": self.scaling,
            "units": self.units,
            "accumulator_bits": self.accumulator_bits,
            "activation_placement": self.activation_placement,
            "act_threshold": self.act_threshold is not None,
        }

    def extra_repr(self) -> str:
        act = self.act_quantizer.name if self.act_quantizer is not None else None
        thr = ", threshold" if self.act_threshold is not None else ""
        return (f"{super().extra_repr()}, w={self.weight_quantizer.name}, a={act}{thr}, scaling={self.scaling}, "
                f"units={self.units}, acc_bits={self.accumulator_bits}")


def _copy_params(dst: nn.Module, src: nn.Module) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)


class BinaryConv2d(BinaryMixin, nn.Conv2d):
    """nn.Conv2d with binarized weights (and optionally activations / 8-bit accumulators)."""

    def __init__(self, *args, weight_quantizer="bnn++", act_quantizer=None, scaling="layer", units="scaled",
                 accumulator_bits=None, activation_placement="threshold", act_threshold=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_binary(weight_quantizer, act_quantizer, scaling, units, accumulator_bits, activation_placement,
                          act_threshold)

    @property
    def input_channels(self) -> int:
        return self.in_channels

    def _input_view(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, 1, 1)  # channels at dim -3: (N, C, H, W) and unbatched (C, H, W)

    def _op(self, x, w, bias):
        return self._conv_forward(x, w, bias)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **spec) -> BinaryConv2d:
        if type(conv) is not nn.Conv2d:
            raise ValueError(f"BinaryConv2d.from_float needs an nn.Conv2d, got {type(conv).__name__}")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype, **spec)
        _copy_params(new, conv)
        new.train(conv.training)
        return new

    def to_float(self, binarized: bool = False) -> nn.Conv2d:
        """The torch twin with the latent weights (or, with binarized=True, the honest s sign(w*))."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, groups=self.groups,
                         bias=self.bias is not None, padding_mode=self.padding_mode,
                         device=self.weight.device, dtype=self.weight.dtype)
        return self._fill_twin(conv, binarized)


class BinaryLinear(BinaryMixin, nn.Linear):
    """nn.Linear with binarized weights (and optionally activations / 8-bit accumulators)."""

    def __init__(self, in_features, out_features, bias=True, *, weight_quantizer="bnn++", act_quantizer=None,
                 scaling="layer", units="scaled", accumulator_bits=None, activation_placement="threshold",
                 act_threshold=None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_binary(weight_quantizer, act_quantizer, scaling, units, accumulator_bits, activation_placement,
                          act_threshold)

    @property
    def input_channels(self) -> int:
        return self.in_features

    def _input_view(self, v: torch.Tensor) -> torch.Tensor:
        return v  # features last: (N, C), (N, L, C) tokens, ...

    def _op(self, x, w, bias):
        return F.linear(x, w, bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, **spec) -> BinaryLinear:
        if type(linear) is not nn.Linear:
            raise ValueError(f"BinaryLinear.from_float needs an nn.Linear, got {type(linear).__name__}")
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype, **spec)
        _copy_params(new, linear)
        new.train(linear.training)
        return new

    def to_float(self, binarized: bool = False) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        return self._fill_twin(lin, binarized)


BINARY_TYPES = {nn.Conv2d: BinaryConv2d, nn.Linear: BinaryLinear}


def binary_layers(model: nn.Module) -> Iterator[tuple[str, BinaryMixin]]:
    """(qualified name, layer) of every binarized layer of `model`, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, BinaryMixin):
            yield name, m


def set_binary_eval(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every binarized layer to its honest binarized forward (or back)."""
    for _, m in binary_layers(model):
        m.honest = enabled
    return model


@contextlib.contextmanager
def evaluation(model: nn.Module, honest: bool = True):
    """Context: eval mode, binarized layers honest (or on their training forward with honest=False);
    restores every module's training flag, every layer's honest flag and BWAA's overflow counters on exit:
    the overflow rate a run reports counts its training steps, never an evaluation's forwards (read the
    counters inside the context to measure an evaluation's own)."""
    modes = {m: m.training for m in model.modules()}
    previous = {name: (m.honest, m.overflow_count.clone(), m.accumulator_count.clone())
                for name, m in binary_layers(model)}
    set_binary_eval(model, honest)
    model.eval()
    try:
        yield model
    finally:
        for name, m in binary_layers(model):
            if name in previous:
                m.honest, overflows, accumulated = previous[name]
                m.overflow_count.copy_(overflows)
                m.accumulator_count.copy_(accumulated)
            else:
                m.honest = False
        for m, mode in modes.items():
            m.training = mode


def binary_eval(model: nn.Module):
    """Context: the honest binarized network in eval mode; restores both on exit."""
    return evaluation(model, honest=True)


def set_progress(model: nn.Module, progress: float) -> None:
    """Move every quantizer's schedules in the model to `progress` in [0, 1] (pcpp.schedules.progress_at);
    ValueError outside."""
    for m in model.modules():
        if isinstance(m, Quantizer):
            m.set_progress(progress)


def set_latent_forward(model: nn.Module, enabled: bool) -> None:
    """Training forward on w* itself (ProxQuant, reverse PC, PTB): see pcpp.rules."""
    for _, m in binary_layers(model):
        m.latent_forward = enabled


def overflow_rates(model: nn.Module, reset: bool = False) -> dict[str, float]:
    """BWAA: per layer with an accumulator, the share in [0, 1] of its dot products that wrapped since the
    last reset (reset=True starts the count again)."""
    out = {}
    for name, m in binary_layers(model):
        if m.accumulator_bits is not None:
            out[name] = m.overflow_rate
            if reset:
                m.reset_overflow()
    return out


def mean_overflow_rate(model: nn.Module) -> float:
    """The share in [0, 1] of all accumulator values that wrapped, over every BWAA layer (0 without one)."""
    n = sum(float(m.accumulator_count) for _, m in binary_layers(model))
    o = sum(float(m.overflow_count) for _, m in binary_layers(model))
    return o / n if n else 0.0


def soft_fraction(model: nn.Module) -> float:
    """Share of all binarized weights whose training-forward value is > 1% of s away from +-s."""
    total, soft = 0, 0.0
    for _, m in binary_layers(model):
        n = m.weight.numel()
        soft += m.soft_fraction() * n
        total += n
    return soft / total if total else 0.0


def binary_signs(model: nn.Module) -> dict[str, torch.Tensor]:
    """sign(w*) of every binarized layer, packed as bool, for flip ratios between epochs."""
    return {name: (m.weight.detach() >= 0).cpu().clone() for name, m in binary_layers(model)}


def flip_ratio(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """The share in [0, 1] of binarized weights whose sign differs between two `binary_signs` records."""
    total = sum(v.numel() for v in before.values())
    flips = sum(int((before[k] != after[k]).sum()) for k in before)
    return flips / total if total else 0.0


def binarized_params(model: nn.Module) -> list[nn.Parameter]:
    """The latent weights w* of the binarized layers (each of its layer's weight shape): what the update
    rules act on (pcpp.rules, paper section 2)."""
    return [m.weight for _, m in binary_layers(model)]


def scale_of(model: nn.Module):
    """`scale_of(p)` for the update rules: the scale s of the layer that owns latent weight p (a detached
    tensor broadcastable to p: a scalar, or (C_out, 1, ...) with channel scaling), 1.0 in raw units.
    KeyError for a tensor that is not a binarized layer's weight."""
    owners = {id(m.weight): m for _, m in binary_layers(model)}

    def scale(p):
        m = owners[id(p)]
        return m.weight_scale() if m.units == "scaled" else 1.0

    return scale
