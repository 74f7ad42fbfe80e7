"""Acceptance test of the pairs and update rules on a least-squares problem over {-1, +1}^4.

min ||A w - b||^2 with A well conditioned and b = A w_opt + small noise: w_opt is the binary optimum
(checked by brute force over the 16 binary points). PC++ pairs train a latent w* through q(w*) (eq. 7);
ProxQuant, reverse PC and PTB train w directly and act through `RuleOptimizer` hooks (the object the
training engine runs the hooks through, pcpp.rules).
"""

import itertools

import pytest
import torch

from pcpp.quantizers import get, names
from pcpp.rules import RuleOptimizer, UpdateRule, get_rule, rule_names

pytestmark = pytest.mark.unit

STEPS = 400
LR = 0.05
W_OPT = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
PCPP_PAIRS = ["bc", "pc", "bnn", "bnn++"]  # the PC++ variants of Table 1 that must reach the optimum

# rule name -> when its final point is binary; "pair" rules are exercised through the PC++ pairs
RULE_ENDS = {"pc++": "pair", "pq": "after_steps", "rpc": "after_finalize", "ptb": "after_finalize"}


def test_rule_table_covers_the_registry():
    missing = sorted(set(rule_names()) - set(RULE_ENDS))
    assert not missing, (f"new update rule(s) {missing}: add each to RULE_ENDS here (when its final point is binary) "
                         "and to ACTS below (the hooks it overrides), so these tests exercise it")
    assert set(RULE_ENDS) == set(rule_names())
    assert set(PCPP_PAIRS) <= set(names())


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    U, _, V = torch.linalg.svd(torch.randn(8, 4, generator=g, dtype=torch.float64), full_matrices=False)
    A = U @ torch.diag(torch.tensor([2.0, 1.8, 1.5, 1.2], dtype=torch.float64)) @ V  # condition number 5/3
    b = A @ W_OPT + 1e-3 * torch.randn(8, generator=g, dtype=torch.float64)

    def loss(w):
        return ((A @ w - b) ** 2).sum()

    # brute force: W_OPT is the unique binary optimum, by a wide margin
    corners = itertools.product([-1.0, 1.0], repeat=4)
    values = {c: loss(torch.tensor(c, dtype=torch.float64)).item() for c in corners}
    ranked = sorted(values, key=values.get)
    assert torch.equal(torch.tensor(ranked[0], dtype=torch.float64), W_OPT)
    assert values[ranked[1]] > values[ranked[0]] + 1.0
    return loss


def _init(seed):
    g = torch.Generator().manual_seed(seed)
    return (0.1 * torch.randn(4, generator=g, dtype=torch.float64)).requires_grad_(True)


def _sign(w):
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("name", PCPP_PAIRS)
def test_pcpp_pairs_reach_the_binary_optimum(problem, name, seed):
    q = get(name)
    w = _init(seed)
    rule = get_rule("pc++")
    assert rule.training_quantizer is None  # the layer keeps its own pair
    opt = RuleOptimizer(torch.optim.SGD([w], lr=LR), rule, [w])
    for step in range(STEPS):
        progress = step / STEPS
        q.set_progress(progress)
        opt.zero_grad()
        problem(q(w)).backward()
        opt.set_progress(progress).step()
    opt.finalize()
    w_star = w.detach()
    F = q.set_progress(1.0).F(w_star)
    # the evaluated point is binary: F(w*) at progress 1 is sign(w*) (BNN++'s SS at mu = 30 within 1e-2)
    assert (F - _sign(w_star)).abs().max().item() < 1e-2, (name, F)
    assert torch.equal(_sign(w_star), W_OPT), (name, w_star)


def _train_rule(problem, name, seed):
    rule = get_rule(name)
    assert rule.training_quantizer == "fp"  # the forward uses w directly
    w = _init(seed)
    opt = RuleOptimizer(torch.optim.SGD([w], lr=LR), rule, [w])
    for step in range(STEPS):
        progress = step / STEPS
        opt.zero_grad()
        problem(w).backward()
        opt.set_progress(progress).step()
    return w, opt


def _assert_binary(w):
    assert torch.all((w.detach().abs() - 1.0).abs() <= 1e-6), w


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("name", [n for n in rule_names() if RULE_ENDS.get(n, "pair") != "pair"])
def test_rules_end_binary(problem, name, seed):
    w, opt = _train_rule(problem, name, seed)
    if RULE_ENDS[name] == "after_steps":
        _assert_binary(w)  # ProxQuant's last prox at rho >= 1 is the sign
    opt.finalize()
    _assert_binary(w)  # reverse PC: the evaluated point is L_rho(w*) at the end; PTB: sign, once


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ptb_reaches_the_optimum_on_a_well_conditioned_problem(problem, seed):
    w, opt = _train_rule(problem, "ptb", seed)
    assert not torch.all(w.detach().abs() == 1.0)  # full precision until the end
    opt.finalize()
    assert torch.equal(w.detach(), W_OPT)


def _param(values):
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))


def test_pq_after_step_applies_L_rho():
    rule = get_rule("pq", rho=0.5)  # q1+ = -0.5, q2- = 0.5, varrho = 0
    p = _param([-0.5, -0.25, 0.2, 0.9])
    rule.after_step([p], 0.3)
    assert p.detach().tolist() == pytest.approx([-1.0, -0.5, 0.4, 1.0])
    rule.before_step([p], 0.3)  # ProxQuant acts after the step only
    assert p.detach().tolist() == pytest.approx([-1.0, -0.5, 0.4, 1.0])


def test_rpc_step_starts_from_L_rho():
    p = _param([-0.25, 0.2])
    p.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)  # taken at w* before the map
    opt = RuleOptimizer(torch.optim.SGD([p], lr=0.1), get_rule("rpc", rho=0.5), [p])
    opt.set_progress(0.5).step()
    assert p.detach().tolist() == pytest.approx([-0.5 - 0.1, 0.4 + 0.1])


def test_ptb_finalize_and_scale():
    p = _param([-0.3, 0.0, 2.0])
    RuleOptimizer(torch.optim.SGD([p], lr=0.1), get_rule("ptb"), [p], scale_of=lambda t: 0.5).finalize()
    assert p.detach().tolist() == [-0.5, 0.5, 0.5]


def test_pq_in_units_of_the_scale():
    p = _param([-0.05, 0.3, 1.0])
    get_rule("pq").after_step([p], 1.0, scale_of=lambda t: t.abs().mean())
    s = (0.05 + 0.3 + 1.0) / 3
    assert p.detach().tolist() == pytest.approx([-s, s, s])


def test_rule_optimizer_delegates():
    p = _param([1.0])
    inner = torch.optim.SGD([p], lr=0.1)
    opt = RuleOptimizer(inner, get_rule("pc++"), [p])
    assert opt.param_groups is inner.param_groups
    p.grad = torch.ones_like(p)
    opt.zero_grad()
    assert p.grad is None
    assert opt.state_dict() == inner.state_dict()


def test_unknown_rule_lists_valid_rules():
    with pytest.raises(ValueError) as e:
        get_rule("proxquant")
    for n in rule_names():
        assert n in str(e.value)


def test_rule_parameter_override():
    assert get_rule("pq").values(0.5) == pytest.approx({"rho": 5.005, "varrho": 0.0})
    assert get_rule("pq", rho=0.5).values(0.7) == {"rho": 0.5, "varrho": 0.0}
    r = get_rule("rpc", rho={"kind": "linear", "start": 0.0, "end": 2.0}, varrho=0.1)
    assert r.values(0.5) == pytest.approx({"rho": 1.0, "varrho": 0.1})


def test_rule_bad_parameters():
    with pytest.raises(ValueError) as e:
        get_rule("pq", mu=3.0)
    assert "rho" in str(e.value) and "varrho" in str(e.value)
    with pytest.raises(ValueError):
        get_rule("ptb", rho=1.0)  # PTB has no parameters
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        get_rule("pq").values(1.5)


# -- the hook interface the engine uses (RuleOptimizer), and the registry -------------------------------------
ACTS = {"pc++": set(), "pq": {"after_step"}, "rpc": {"before_step", "finalize"}, "ptb": {"finalize"}}


def test_acts_reports_the_overridden_hooks():
    acts = {n: {h for h in ("before_step", "after_step", "finalize") if get_rule(n).acts(h)} for n in rule_names()}
    missing = sorted(set(acts) - set(ACTS))
    assert not missing, f"new update rule(s) {missing}: add each to ACTS here with the hooks it overrides"
    assert acts == ACTS
    with pytest.raises(ValueError, match="before_step"):
        get_rule("pq").acts("on_step")


class _Recorder(UpdateRule):
    name = "recorder"

    def __init__(self, **params):
        super().__init__(**params)
        self.calls = []

    def before_step(self, params, progress, scale_of=None):
        self.calls.append(("before", progress, [float(p.detach()) for p in params]))

    def after_step(self, params, progress, scale_of=None):
        self.calls.append(("after", progress, [float(p.detach()) for p in params]))


def test_rule_optimizer_runs_hooks_around_the_step_and_syncs_only_after_acting_hooks():
    p = _param([1.0])
    p.grad = torch.ones_like(p)
    synced = []
    rule = _Recorder()
    opt = RuleOptimizer(torch.optim.SGD([p], lr=0.5), rule, [p], sync=lambda: synced.append(len(rule.calls)))
    assert isinstance(opt, torch.optim.Optimizer)
    opt.set_progress(0.25).step()
    assert rule.calls == [("before", 0.25, [1.0]), ("after", 0.25, [0.5])]  # the step ran between the hooks
    assert synced == [1, 2]
    opt.finalize()  # not overridden: no call, no sync
    assert synced == [1, 2]
    quiet = RuleOptimizer(torch.optim.SGD([p], lr=0.5), get_rule("pc++"), [p], sync=lambda: synced.append(0))
    quiet.step()
    quiet.finalize()
    assert synced == [1, 2]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        opt.set_progress(-0.1)


def test_rule_optimizer_closure_and_shared_groups():
    p = _param([2.0])
    inner = torch.optim.SGD([p], lr=0.1)
    opt = RuleOptimizer(inner, get_rule("pq", rho=10.0), [p])

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) == 4.0
    assert p.detach().tolist() == [1.0]  # 2 - 0.1 * 4 = 1.6, then L_10 = sign
    opt.param_groups[0]["lr"] = 0.3  # an lr schedule writes through the wrapper
    assert inner.param_groups[0]["lr"] == 0.3
    assert opt.defaults is inner.defaults and opt.state is inner.state


def test_a_registered_rule_is_built_by_name_and_unregistered():
    from pcpp.rules import RULES, register

    register(_Recorder)
    try:
        assert "recorder" in rule_names()
        assert isinstance(get_rule("recorder"), _Recorder)
        with pytest.raises(ValueError, match="already registered"):
            register(_Recorder)
    finally:
        RULES.unregister("recorder")
    assert "recorder" not in rule_names()


def test_old_import_path_still_works():
    from pcpp.quantizers import get_rule as old_get
    from pcpp.quantizers import rules as old

    assert old.RuleOptimizer is RuleOptimizer and old_get is get_rule
