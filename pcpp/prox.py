"""The proximal map L_rho^varrho of ProxConnect onto Q = {-1, +1} (paper section 2, Appendix A, eq. (10)).

PC's forward quantizer (the `pc` pair) and the ProxQuant / reverse-PC update rules (pcpp.rules) all use
this one map. The paper's printed middle pieces are garbled; docs/contracts.md gives the intended map, written
here once:

    q1+ = min(0, -1 + rho),  q2- = max(0, 1 - rho),  p- = max(-1, -varrho),  p+ = min(1, varrho)

    L(w) = -1                                    for w <= q1+
           linear from (q1+, -1) to (0, p-)      for q1+ < w < 0
           linear from (0, p+) to (q2-, +1)      for 0 <= w < q2-   (a jump at 0 from p- to p+)
           +1                                    for w >= q2-

rho >= 1 gives sign (with sign(0) = +1); rho -> 0 with varrho = 0 approaches the identity on [-1, 1].
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Breakpoints(NamedTuple):
    """The four numbers that fix L_rho^varrho: where it reaches -1 / +1 and its values either side of 0."""

    q1_plus: float  # L = -1 up to here (<= 0)
    q2_minus: float  # L = +1 from here (>= 0)
    p_minus: float  # L(0-), in [-1, 0]
    p_plus: float  # L(0+) = L(0), in [0, 1]


def breakpoints(rho: float, varrho: float = 0.0) -> Breakpoints:
    """q1+, q2-, p-, p+ of L_rho^varrho. Raises ValueError unless rho >= 0 and varrho >= 0 (NaN refused)."""
    if not (rho >= 0 and varrho >= 0):
        raise ValueError(f"L_rho needs rho >= 0 and varrho >= 0, got rho={rho}, varrho={varrho}")
    return Breakpoints(min(0.0, -1.0 + rho), max(0.0, 1.0 - rho), max(-1.0, -varrho), min(1.0, varrho))


def prox_linear(w: torch.Tensor, rho: float, varrho: float = 0.0) -> torch.Tensor:
    """L_rho^varrho(w), elementwise: a tensor of w's shape and dtype with values in [-1, 1].

    w: any shape, in the units the caller chose (the rules pass w / s, s the layer's scale); rho, varrho:
    plain floats (the schedules' current values). No autograd is involved. Raises ValueError for a
    negative (or NaN) rho or varrho.
    """
    q1p, q2m, pm, pp = breakpoints(rho, varrho)
    neg = torch.full_like(w, -1.0)
    pos = torch.ones_like(w)
    if q1p < 0.0:
        neg = torch.where(w > q1p, -1.0 + (w - q1p) * ((pm + 1.0) / (0.0 - q1p)), neg)
    if q2m > 0.0:
        pos = torch.where(w < q2m, pp + w * ((1.0 - pp) / q2m), pos)
    return torch.where(w >= 0, pos, neg)


prox = prox_linear  # the paper's name for the map: prox(w) = L_rho^varrho(w)
