"""Forward/backward proximal quantizer pairs (paper eq. (6)-(7), Table 1, Appendix F) and update rules.

    >>> from pcpp import quantizers
    >>> q = quantizers.get("bnn++")        # mu linear 5 -> 30
    >>> q.set_progress(0.5).params
    {'mu': 17.5}
    >>> y = q(w)                           # F(w) forward, grad * B(w) backward
"""

from pcpp.quantizers import pairs as _pairs  # noqa: F401  (registers the pairs)
from pcpp.quantizers.base import Quantizer, from_state, get, names, quantizer_class, register
from pcpp.quantizers.functions import prox_linear, sign, sign_swish, sign_swish_grad
from pcpp.quantizers.rules import RuleOptimizer, UpdateRule, get_rule, rule_names

__all__ = [
    "Quantizer", "RuleOptimizer", "UpdateRule", "from_state", "get", "get_rule", "names", "prox_linear",
    "quantizer_class", "register", "rule_names", "sign", "sign_swish", "sign_swish_grad",
]
