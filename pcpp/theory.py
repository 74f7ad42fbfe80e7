"""Corollaries 1 and 2 of the paper as usable tools.

Corollary 1: (F, B) admits F = T o P, B = T' o P (eq. (6)) iff F and B are both functions of
P(w) = int_{-inf}^w dF / B and P is proximal (monotone, compact-valued, closed graph).
`check` decides this numerically on a grid: jumps of F count as Dirac masses of dF, and where B = 0 and
dF = 0 the integrand is free, so P is chosen increasing there (slope `free_slope`), which is how BNN passes
(the paper's eq. (9) uses slope 1/mu outside [-1, 1]).

Corollary 2: a continuously differentiable F with bounded-support derivative pairs with B = F'.
`legitimize` turns a backward factor B into the admissible pair (int B, B). The primitive is centred,
F(-inf) = -F(+inf) = -(1/2) int B: an even B gives an odd F with F(0) = 0, and the registered Corollary 2
pairs come back unchanged (legitimize(ede) = ede+, legitimize(bnn+) = bnn++, legitimize(poly) = poly+ at k = 1).
Any other constant would do for Corollary 1 (T is defined up to one), but F(-inf) = -1 added k - 1 to
EDE's F whenever int B = 2k != 2 (F(0) = 9 at t = 0.1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pcpp.quantizers import get as get_quantizer
from pcpp.quantizers.base import Quantizer, _constant, _Pair

ArrayFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Verdict:
    """Result of `check`: `admissible`, a readable `reason`, and for admissible pairs T and P."""

    admissible: bool
    reason: str
    name: str
    w: np.ndarray = field(repr=False)
    F: np.ndarray = field(repr=False)
    B: np.ndarray = field(repr=False)
    P_values: np.ndarray = field(repr=False)
    params: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.admissible

    def P(self, w):
        """The proximal map P(w) (admissible pairs only), interpolated from the grid."""
        self._need_admissible("P")
        return np.interp(np.asarray(w, dtype=np.float64), self.w, self.P_values)

    def T(self, p):
        """The transformation T with F = T o P (admissible pairs only)."""
        self._need_admissible("T")
        return np.interp(np.asarray(p, dtype=np.float64), self.P_values, self.F)

    def _need_admissible(self, what: str):
        if not self.admissible:
            raise ValueError(f"{self.name}: no {what} exists, the pair is not admissible ({self.reason})")

    def __str__(self) -> str:
        word = "admissible" if self.admissible else "NOT admissible"
        params = ", ".join(f"{k}={v:g}" for k, v in self.params.items())
        return f"{self.name}{f' ({params})' if params else ''}: {word}: {self.reason}"


def _grid(domain: tuple[float, float], n: int) -> np.ndarray:
    lo, hi = map(float, domain)
    if not (lo < 0.0 < hi):
        raise ValueError(f"domain must contain 0 strictly inside, got {domain}")
    h = (hi - lo) / (n - 1)
    # 0 sits at the midpoint of an interval: a jump of F at 0 (sign(0) = +1) is then weighed with B(0).
    k = np.arange(int(np.floor(lo / h - 0.5)), int(np.ceil(hi / h - 0.5)) + 1)
    return (k + 0.5) * h


def _resolve(F, B, params) -> tuple[str, ArrayFn, ArrayFn, dict]:
    if isinstance(F, str):
        progress = params.pop("progress", None)
        q = get_quantizer(F, **params)
        if progress is not None:
            q.set_progress(progress)
        return F, q.F, q.B, q.params
    if isinstance(F, Quantizer):
        if params:
            raise ValueError(f"parameters {sorted(params)} given with a built quantizer; set them when building")
        return F.name, F.F, F.B, F.params
    if not (callable(F) and callable(B)):
        raise ValueError("check(F, B) needs a registered name, a Quantizer, or two callables F and B")
    return params.pop("name", "custom pair"), F, B, {}


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index ranges of the True runs of a boolean vector."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def check(F, B=None, *, domain=(-3.0, 3.0), n: int = 60_000, free_slope: float = 1.0,
          tol: float = 1e-6, **params) -> Verdict:
    """Corollary 1: does (F, B) admit the decomposition (6)?

    `F` is a registered name (with its parameters as keywords, and `progress=`), a Quantizer, or a
    callable with `B` the backward callable. Returns a Verdict (truthy when admissible).
    """
    name, f, b, values = _resolve(F, B, dict(params))
    w = _grid(domain, n)
    h = w[1] - w[0]
    wt = torch.from_numpy(w)
    Fv = f(wt).double().numpy()
    Bn = b(wt).double().numpy()
    Bm = b(torch.from_numpy(0.5 * (w[1:] + w[:-1]))).double().numpy()
    if not (np.isfinite(Fv).all() and np.isfinite(Bn).all() and np.isfinite(Bm).all()):
        raise ValueError(f"{name}: F or B is not finite on {domain}")

    def verdict(ok, reason, P=None):
        return Verdict(ok, reason, name, w, Fv, Bn, np.zeros_like(w) if P is None else P, values)

    def at(i):
        return f"w = {w[i] + h / 2:+.3f}"

    dF = np.diff(Fv)
    tol_f = 1e-9 * max(1.0, np.abs(Fv).max())
    tol_b = 1e-9 * max(1.0, np.abs(Bn).max())
    zero_b = np.abs(Bm) <= tol_b
    # Where B vanishes (or crosses zero) inside an interval, F's change there is no more than the
    # endpoints' B allows: the integrand is free, not infinite.
    # |B| over a few neighbouring nodes: a tabulated F (legitimize) may move up to one table step past
    # the edge of B's support; a genuine jump of F where B = 0 is orders of magnitude larger.
    absB = np.pad(np.abs(Bn), 3, mode="edge")
    b_ends = np.max([absB[k: k + len(dF)] for k in range(1, 7)], axis=0)
    smooth = np.abs(dF) <= tol_f + 1.01 * h * b_ends
    crossing = (Bn[:-1] * Bn[1:] < 0) & smooth
    free = (zero_b & smooth) | crossing
    blocked = zero_b & ~free
    if blocked.any():
        i = int(np.flatnonzero(blocked)[0])
        return verdict(False, f"F changes by {dF[i]:+.3g} at {at(i)} where B = 0, so P = int dF/B is infinite")

    inc = np.where(free, free_slope * h, dF / np.where(free, 1.0, Bm))
    P = np.concatenate([[0.0], np.cumsum(inc)])
    j = int(np.searchsorted(w, 0.0)) - 1  # the interval (w[j], w[j+1]) holds 0 at its midpoint
    P -= 0.5 * (P[j] + P[j + 1])

    decreasing = inc < -tol * h
    if decreasing.any():
        i = int(np.flatnonzero(decreasing)[0])
        return verdict(False, f"P = int dF/B decreases at {at(i)} (dF/dw = {dF[i] / h:+.3g}, "
                              f"B = {Bm[i]:+.3g} have opposite signs): P is not monotone", P)

    flat = (np.abs(inc) <= tol * h) & ~free
    b_scale = max(1.0, np.abs(Bm).max())
    for start, stop in _runs(flat):
        seg = Bm[start:stop]
        if seg.max() - seg.min() > tol * b_scale:
            return verdict(False, f"P is constant on [{w[start]:+.3f}, {w[stop]:+.3f}] (F flat there) but B "
                                  f"varies from {seg.max():.3g} to {seg.min():.3g}: B is not a function of P", P)

    jumps = int(np.sum(np.abs(inc) > 1e3 * h))
    shape = "with a jump" if jumps == 1 else f"with {jumps} jumps" if jumps else "continuous"
    return verdict(True, f"P = int dF/B is monotone ({shape}) on [{domain[0]:g}, {domain[1]:g}] and F, B are "
                         f"functions of P, so F = T o P, B = T' o P (eq. 6)", P)


class Legitimized(Quantizer):
    """The Corollary 2 pair built from a backward factor: F = int_{-inf}^w B - (1/2) int B, B unchanged.

    Centred so that F(-inf) = -F(+inf); an even B gives an odd F (F(0) = 0).
    """

    name = "legitimized"
    forward_formula = "int_{-inf}^w B - (1/2) int_{-inf}^{+inf} B"
    source = "Corollary 2"

    def __init__(self, backward: Quantizer | ArrayFn, label: str | None = None):
        super().__init__()
        self.source_quantizer = backward if isinstance(backward, Quantizer) else None
        self._backward = backward.B if isinstance(backward, Quantizer) else backward
        self.label = label or (f"legit({backward.name})" if self.source_quantizer else "legit(B)")
        self.backward_formula = backward.backward_formula if self.source_quantizer else "B(w)"
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_progress(self, progress: float):
        super().set_progress(progress)
        if self.source_quantizer is not None:
            self.source_quantizer.set_progress(progress)
        return self

    @property
    def params(self) -> dict[str, float]:
        return self.source_quantizer.params if self.source_quantizer is not None else {}

    def _table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = tuple(sorted(self.params.items()))
        if key not in self._tables:
            self._tables = {key: _primitive(self._backward, self.label)}
        return self._tables[key]

    def B(self, w):
        return self._backward(w)

    def F(self, w):
        # Trapezoid from the table node below w, with B evaluated at w itself: F stays exactly flat
        # wherever B vanishes, so the pair passes Corollary 1's test at the edges of B's support.
        xs, fs, bs = self._table()
        x = w.detach().to(torch.float64).clamp(xs[0], xs[-1])
        i = (torch.searchsorted(xs.to(x.device), x, right=True) - 1).clamp(0, len(xs) - 1)
        x0 = xs.to(x.device)[i]
        out = fs.to(x.device)[i] + 0.5 * (bs.to(x.device)[i] + self._backward(x).double()) * (x - x0)
        return out.to(w.dtype)

    def forward(self, w):
        return self.apply_pair(w)

    def apply_pair(self, x: torch.Tensor, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                   out_scale: torch.Tensor | None = None, params: dict | None = None) -> torch.Tensor:
        """Quantizer.apply_pair composed from separate autograd ops, never fused (pcpp.kernels): F is a table
        lookup of this instance at its current parameters, not a pure forward_fn; `params`, when given, must be
        those current ones."""
        if params is not None and params != self.params:
            raise ValueError(f"{self.label}: its F is tabulated at the current parameters {self.params}, "
                             f"not at {params}; use set_progress")
        u = x if shift is None else x - shift
        if scale is not None:
            u = u / _constant(scale)
        y = _Pair.apply(u, lambda v: self.F(v), lambda v: self.B(v), {})
        return y if out_scale is None else _constant(out_scale) * y

    def extra_repr(self) -> str:
        return self.label


def _primitive(B: ArrayFn, label: str, h_min: float = 1e-4, max_points: int = 1 << 21):
    """Tabulate F(w) = int_{-L}^w B - (1/2) int_{-L}^L B on [-L, L], L grown until B has vanished at both ends.

    Centring on the table's own total makes F(-L) = -F(L) exactly, and, for an even B sampled on the
    symmetric grid, F(0) = 0 up to rounding.
    """
    L = 8.0
    while True:
        ends = B(torch.tensor([-L, L], dtype=torch.float64)).abs().max().item()
        if ends * L < 1e-12:
            break
        if L >= 4096:
            raise ValueError(f"{label}: B does not vanish at +-inf (|B(+-{L:g})| = {ends:.3g}); its primitive is "
                             "unbounded, and Corollary 2 needs a derivative of bounded support")
        L *= 2
    n = int(min(max_points, np.ceil(2 * L / h_min))) + 1
    xs = torch.linspace(-L, L, n, dtype=torch.float64)
    bs = B(xs).double()
    steps = 0.5 * (bs[1:] + bs[:-1]) * (xs[1:] - xs[:-1])
    fs = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(steps, 0)])
    fs -= 0.5 * fs[-1]
    return xs, fs, bs


def legitimize(q: Quantizer | str | ArrayFn, **params) -> Legitimized:
    """Corollary 2: the admissible pair whose F is the primitive of `q`'s B, centred: F(-inf) = -F(+inf).

    `q` is a registered name (its parameters as keywords), a Quantizer, or a callable B. Raises
    ValueError when B does not vanish at +-inf (the primitive is unbounded).
    """
    if isinstance(q, str):
        q = get_quantizer(q, **params)
    elif params:
        raise ValueError(f"parameters {sorted(params)} are only accepted with a quantizer name")
    legit = Legitimized(q)
    legit._table()  # fails now, not at first use, when B has no bounded primitive
    return legit
