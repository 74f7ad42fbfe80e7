"""Moved: the update rules are pcpp.rules (beside the quantizers, not inside them).

This module re-exports pcpp.rules so that `pcpp.quantizers.rules` keeps working for one release.
"""

from pcpp.rules import *  # noqa: F401,F403
from pcpp.rules import (  # noqa: F401  (names `import *` leaves out)
    HOOKS,
    RULES,
    PCPlusPlus,
    PostTraining,
    ProxQuant,
    ReversePC,
    RuleOptimizer,
    ScaleFn,
    UpdateRule,
    apply_scaled,
    get_rule,
    register,
    rule_names,
)
from pcpp.rules import apply_scaled as _apply_scaled  # noqa: F401  (the old private name)
