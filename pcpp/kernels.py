"""Fused elementwise kernels: one compiled pass per tensor where torch.compile works, eager torch otherwise.

The quantizer pairs (pcpp.quantizers.fused) and BWAA's accumulator wrap (pcpp.accumulators) write their
forward and backward as plain torch functions of tensors and floats. Run eagerly, each torch op is a pass over
the tensor with a full-size temporary; compiled (torch.compile, Inductor's C++ or Triton code), a function is
one vectorized loop. Measured on a ResNet-20 activation (128x16x32x32, one thread): the bnn++ pair's forward
and backward 5.5 ms compiled (bound by its tanh), against 1.4 ms for ReLU's; ResNet-20 BWA's training step went
from 1.56x to 1.20x full precision's, BWAA's from 1.85x to 1.31x (bench/layers.py, 2 threads, shared CPU), and to
1.17x and 1.22x with tanh through exp in compiled CPU kernels (pcpp.quantizers.functions.tanh).
Compiled values differ from eager ones by rounding only (Inductor's tanh is not ATen's by an ulp), within
1e-6 plus the float32 formulas' own rounding (tests/integration/test_fused_compiled.py).

`PCPP_FUSED` (read at import; `set_mode` / `using` change it) chooses the path:

- `auto` (default, also `1`): fused autograd functions; a kernel is compiled for tensors of at least
  COMPILE_MIN_NUMEL elements and run eagerly below (a compile costs seconds per kernel, 40 s cold on 2 busy
  cores, cached on disk by Inductor for later processes; small tensors gain nothing, and unit tests stay
  fast). Weights follow the same rule: ResNet-20's and DeiT-T's (at most 1.5e5 elements) stay eager, a larger
  one (ViT-B's 768x3072 MLP) compiles; compiled, ResNet-20's weights measured no faster (bench/layers.py
  --kernels auto compile);
- `compile`: compile at every size; `eager`: the fused functions, never compiled;
- `reference` (also `0`): the unfused code, each pair through its generic autograd function and every step a
  separate autograd op: the ground truth of tests/unit/test_fused.py.

When compiling fails (no C++ compiler, no Triton for the GPU, an Inductor error), one RuntimeWarning says why,
and every later kernel on that device type runs eagerly: the same functions, so the same values.
"""

from __future__ import annotations

import contextlib
import os
import types
import warnings
from collections.abc import Callable

import torch

MODES = ("auto", "compile", "eager", "reference")
_ALIASES = {"1": "auto", "0": "reference", "": "auto"}
ENV = "PCPP_FUSED"
# Smallest tensor worth a compiled kernel: ResNet-20's smallest activation is 64x8x8 = 2^12 per image, so from
# batch 64 up every activation compiles; unit tests' batches (<= 8 images) and the weights (at most 1.5e5
# elements in ResNet-20 and DeiT-T) stay eager.
COMPILE_MIN_NUMEL = 2**18


def _check(mode: str, source: str = "pcpp.kernels.set_mode") -> str:
    """The mode `mode` names (case and surrounding blanks aside, aliases resolved); ValueError naming the value
    as given and where it came from (`source`: the environment variable or the function)."""
    key = str(mode).strip().lower()
    resolved = _ALIASES.get(key, key)
    if resolved not in MODES:
        raise ValueError(f"unknown fused-kernel mode {mode!r} ({source}); valid: {', '.join(MODES)} (or 1 = auto, "
                         "0 = reference)")
    return resolved


_mode = _check(os.environ.get(ENV, "auto"), ENV)
_compiled: dict[tuple[Callable, str], Callable] = {}
_broken: dict[str, str] = {}  # device type -> why compiling failed there


def mode() -> str:
    """The current path: auto, compile, eager or reference."""
    return _mode


def fused() -> bool:
    """True unless the reference (unfused) path is selected."""
    return _mode != "reference"


def set_mode(new: str) -> str:
    """Select the path (see the module docstring); returns the previous one. ValueError for an unknown mode."""
    global _mode
    previous, _mode = _mode, _check(new)
    return previous


@contextlib.contextmanager
def using(new: str):
    """Context: run with path `new`, then restore the previous one."""
    previous = set_mode(new)
    try:
        yield
    finally:
        set_mode(previous)


def compile_failures() -> dict[str, str]:
    """Device types where compiling failed (so kernels run eagerly there), with the error."""
    return dict(_broken)


def _own_code(fn: Callable, name: str) -> Callable:
    """fn with a code object of its own: torch.compile caches (and limits recompiles) per code object, and
    kernels made by one factory share theirs, so each pair would count against one shared limit."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _compiled_kernel(fn: Callable, name: str) -> Callable:
    kernel = _compiled.get((fn, name))
    if kernel is None:
        # dynamic: one kernel for every batch size and layer shape; floats (mu, rho, ...) are kernel arguments
        # (torch 2.14 does not specialize them), so a schedule moving every step recompiles nothing.
        kernel = _compiled[(fn, name)] = torch.compile(_own_code(fn, name), dynamic=True)
    return kernel


def run(fn: Callable, name: str, like: torch.Tensor, *args, **kwargs):
    """fn(*args, **kwargs), compiled when the mode and the size of `like` (the tensor it loops over) say so.

    Each (fn, name) compiles on its own (its own recompile budget): callers name the role (weight or
    activation) so that the variants of one role (ranks, dtypes, with or without a shift) stay few.
    """
    device = like.device.type
    if (_mode == "eager" or (_mode == "auto" and like.numel() < COMPILE_MIN_NUMEL) or device in _broken
            or torch.compiler.is_compiling()):  # inside a user's torch.compile: traced inline
        return fn(*args, **kwargs)
    try:
        return _compiled_kernel(fn, name)(*args, **kwargs)
    except Exception as err:  # noqa: BLE001  (any compiler failure: fall back, never crash)
        out = fn(*args, **kwargs)  # bad inputs raise here as well: they are the caller's error, not the compiler's
        _broken[device] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        warnings.warn(f"pcpp: compiling the fused kernel {name!r} failed on {device} ({_broken[device]}); "
                      f"fused kernels run eagerly there from now on (same values, slower). {ENV}=eager "
                      "skips the attempt.", RuntimeWarning, stacklevel=2)
        return out
