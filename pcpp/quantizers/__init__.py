"""Forward/backward proximal quantizer pairs (paper eq. (6)-(7), Table 1, Appendix F).

    >>> from pcpp import quantizers
    >>> q = quantizers.get("bnn++")        # mu log-linear 1.25 -> 30.4
    >>> q.set_progress(0.5).params
    {'mu': 3.872983346207417}
    >>> y = q(w)                           # F(w) forward, grad * B(w) backward

The update rules (ProxQuant, reverse PC, PTB) live beside the pairs in pcpp.rules; their names stay
importable from here (RuleOptimizer, UpdateRule, get_rule, rule_names) for one release.
"""

from pcpp.quantizers import pairs as _pairs  # noqa: F401  (registers the pairs)
from pcpp.quantizers.base import QUANTIZERS, Quantizer, from_state, get, names, quantizer_class, register
from pcpp.quantizers.functions import prox_linear, sign, sign_swish, sign_swish_grad

_RULE_NAMES = ("RuleOptimizer", "UpdateRule", "get_rule", "rule_names")

__all__ = [
    "QUANTIZERS", "Quantizer", "RuleOptimizer", "UpdateRule", "from_state", "get", "get_rule", "names",
    "prox_linear", "quantizer_class", "register", "rule_names", "sign", "sign_swish", "sign_swish_grad",
]


def __getattr__(name: str):
    # Lazily: pcpp.rules imports pcpp.quantizers.functions, so an eager import here would be a cycle.
    if name in _RULE_NAMES:
        from pcpp import rules

        return getattr(rules, name)
    raise AttributeError(f"module 'pcpp.quantizers' has no attribute {name!r}")
