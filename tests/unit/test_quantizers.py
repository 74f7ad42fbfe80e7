"""Forward/backward pairs against closed forms written independently here, in numpy (from docs/contracts.md's
pair definitions and the paper's Table 1 / Appendix F).

Every test loops over the registry (`quantizers.names()`); the per-name tables below must have exactly
the registry's keys, so a newly registered pair fails here until its closed form is written down.
"""

import json
import math

import numpy as np
import pytest
import torch

from pcpp import quantizers
from pcpp.quantizers import from_state, get, names

pytestmark = pytest.mark.unit

NAMES = names()
PROGRESS = (0.0, 0.25, 0.5, 1.0)
SQRT2 = math.sqrt(2.0)


# ---- closed forms, numpy float64, written from docs/contracts.md and the paper (not from the library) ----

def np_sign(w):
    return np.where(w >= 0, 1.0, -1.0)


def np_ss(w, mu):
    x = mu * w / 2
    return x / np.cosh(x) ** 2 + np.tanh(x)


def np_dss(w, mu):
    x = mu * w / 2
    return mu * (1 - x * np.tanh(x)) / np.cosh(x) ** 2


def np_prox(w, rho, varrho=0.0):
    """L_rho^varrho of docs/contracts.md: -1 | line (q1+,-1)->(0,p-) | jump to p+ | line (0,p+)->(q2-,1) | +1."""
    q1p, q2m = min(0.0, -1.0 + rho), max(0.0, 1.0 - rho)
    pm, pp = max(-1.0, -varrho), min(1.0, varrho)
    out = np.empty_like(w)
    neg = w < 0
    out[neg] = np.interp(w[neg], [q1p, 0.0], [-1.0, pm]) if q1p < 0 else -1.0
    out[~neg] = np.interp(w[~neg], [0.0, q2m], [pp, 1.0]) if q2m > 0 else 1.0
    return out


def np_poly(x):
    """Bi-Real's polynomial: -1 | 2x + x^2 | 2x - x^2 | +1 on (-inf, -1, 0, 1, inf)."""
    return np.select([x < -1, x < 0, x < 1], [-np.ones_like(x), 2 * x + x * x, 2 * x - x * x], 1.0)


def np_dpoly(x):
    return np.select([x < -1, x < 0, x <= 1], [np.zeros_like(x), 2 + 2 * x, 2 - 2 * x], 0.0)


def ones(w, **_):
    return np.ones_like(w)


# name -> (F(w, **params), B(w, **params)), written from the pairs' definitions (docs/contracts.md, the paper's Table 1)
CLOSED_FORMS = {
    "fp": (lambda w: w, ones),
    "bc": (lambda w: np_sign(w), ones),
    "pc": (lambda w, rho, varrho: np_prox(w, rho, varrho), ones),
    "bnn": (lambda w: np_sign(w), lambda w: (np.abs(w) <= 1).astype(float)),
    "bnn+": (lambda w, mu: np_sign(w), lambda w, mu: np_dss(w, mu)),
    "bnn++": (lambda w, mu: np_ss(w, mu), lambda w, mu: np_dss(w, mu)),
    "poly": (lambda w: np_sign(w), lambda w: (2 - 2 * np.abs(w)) * (np.abs(w) <= 1)),
    "poly+": (lambda w, k: np_poly(k * w), lambda w, k: k * np_dpoly(k * w)),
    "rbnn": (lambda w, t, k: np_sign(w), lambda w, t, k: k * np.maximum(0.0, SQRT2 * t - t * t * np.abs(w))),
    "ede": (lambda w, t, k: np_sign(w), lambda w, t, k: k * t * (1 - np.tanh(t * w) ** 2)),
    "ede+": (lambda w, t, k: k * np.tanh(t * w), lambda w, t, k: k * t * (1 - np.tanh(t * w) ** 2)),
    "react": (lambda w, beta: np_sign(w - beta), lambda w, beta: (np.abs(w - beta) <= 1).astype(float)),
}


def _ede_t(p):
    return 0.1 * 100.0**p  # log-linear 0.1 -> 10


def _rbnn_t(p):
    return 0.01 * 1000.0**p  # R-BNN: T_min = 1e-2, T_max = 1e1, log-linear


# name -> default parameters at progress p (the pairs' default schedules, section 4.1); None: checked apart
DEFAULT_PARAMS = {
    "fp": lambda p: {},
    "bc": lambda p: {},
    "pc": lambda p: {"rho": 0.01 + p * (10.0 - 0.01), "varrho": 0.0},
    "bnn": lambda p: {},
    "bnn+": lambda p: {"mu": 5.0},
    "bnn++": lambda p: {"mu": 1.25 * (30.4 / 1.25) ** p},  # log-linear 1.25 -> 30.4 (pairs.BNNPlusPlus: why)
    "poly": lambda p: {},
    "poly+": None,  # "k increased so that F -> sign": the ramp's end is the library's; see test_poly_plus_k
    "rbnn": lambda p: {"t": _rbnn_t(p), "k": max(1.0 / _rbnn_t(p), 1.0)},
    "ede": lambda p: {"t": _ede_t(p), "k": max(1.0 / _ede_t(p), 1.0)},
    "ede+": lambda p: {"t": _ede_t(p), "k": max(1.0 / _ede_t(p), 1.0)},
    "react": lambda p: {"beta": 0.0},
}

# name -> is B the derivative of F (F continuously differentiable, Corollary 2 pairs)? PC is not: it pairs
# L_rho with the identity backward (Table 1); its F' is checked against L_rho's slopes on its own.
B_IS_DF = {
    "fp": True, "bc": False, "pc": False, "bnn": False, "bnn+": False, "bnn++": True, "poly": False,
    "poly+": True, "rbnn": False, "ede": False, "ede+": True, "react": False,
}


@pytest.mark.parametrize("table", [CLOSED_FORMS, DEFAULT_PARAMS, B_IS_DF],
                         ids=["closed_forms", "default_params", "b_is_df"])
def test_tables_cover_the_registry(table):
    assert set(table) == set(NAMES)


def _points(seed=0, n=2000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    special = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 1e-9, -1e-9, 0.99, -0.99, 1.01, -1.01]
    return np.concatenate([rng.uniform(-3, 3, n), rng.normal(0, 0.3, n), special])


def _params(q) -> dict:
    return {k: float(v) for k, v in q.params.items()}


# ---- values --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("name", NAMES)
def test_forward_and_backward_match_closed_forms(name, progress):
    q = get(name).set_progress(progress)
    w = _points()
    F, B = CLOSED_FORMS[name]
    wt = torch.from_numpy(w)
    np.testing.assert_allclose(q.F(wt).numpy(), F(w, **_params(q)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(q.B(wt).numpy(), B(w, **_params(q)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("name", [n for n in NAMES if DEFAULT_PARAMS[n] is not None])
def test_default_schedules(name, progress):
    expected = DEFAULT_PARAMS[name]
    got = get(name).set_progress(progress).params
    assert set(got) == set(expected(progress))
    for k, v in expected(progress).items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k


def test_poly_plus_k():
    ks = [get("poly+").set_progress(p).params["k"] for p in np.linspace(0, 1, 11)]
    assert ks[0] == pytest.approx(1.0)  # Bi-Real's polynomial itself at the start (= legitimize(poly))
    assert all(b > a for a, b in zip(ks, ks[1:]))
    q = get("poly+").set_progress(1.0)
    w = torch.linspace(-3, 3, 6001, dtype=torch.float64)
    far = w.abs() >= 1.0 / ks[-1]
    assert torch.equal(q.F(w)[far], torch.where(w[far] >= 0, 1.0, -1.0).double())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_preserved(name, dtype):
    q = get(name).set_progress(0.5)
    w = torch.randn(3, 4, 5, dtype=dtype)
    for out in (q.F(w), q.B(w), q(w)):
        assert out.shape == w.shape and out.dtype == dtype


@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("name", NAMES)
def test_sign_of_zero_is_plus_one(name, progress):
    """Wherever F is sign-like (takes only the values +-1), F(0) = +1, also for -0.0."""
    q = get(name).set_progress(progress)
    probe = torch.cat([torch.linspace(-3, -1e-6, 3000), torch.linspace(1e-6, 3, 3000)]).double()
    if not torch.all(q.F(probe).abs() == 1.0):
        return
    zeros = torch.tensor([0.0, -0.0, 1e-300, -1e-300], dtype=torch.float64)
    assert q.F(zeros).tolist() == [1.0, 1.0, 1.0, -1.0]
    assert q(zeros).tolist() == [1.0, 1.0, 1.0, -1.0]


def test_sign_like_pairs_include_the_sign_pairs():
    # guards the test above against vacuity: the sign-forward pairs of Table 1 are detected as such
    sign_like = {n for n in NAMES if bool(get(n).is_binary)}
    assert {"bc", "bnn", "bnn+", "poly", "rbnn", "ede", "react"} <= sign_like
    assert get("pc").set_progress(1.0).is_binary


# ---- sign-Swish ----------------------------------------------------------------------------------------

def test_sign_swish_check_values():
    w = torch.tensor([0.1, 0.5], dtype=torch.float64)
    q = get("bnn++", mu=5.0)
    for F in (q.F(w), quantizers.sign_swish(w, 5.0)):
        assert F.tolist() == pytest.approx([0.479922, 1.198802], abs=1e-5)
    for B in (q.B(w), quantizers.sign_swish_grad(w, 5.0)):
        assert B.tolist() == pytest.approx([4.41229, -0.084622], abs=1e-5)


@pytest.mark.parametrize("mu", [5.0, 17.5, 30.0])
def test_sign_swish_overshoot_and_negative_slope(mu):
    q = get("bnn++", mu=mu)
    w = torch.linspace(-3, 3, 600_001, dtype=torch.float64)
    F, B = q.F(w), q.B(w)
    assert F.max().item() == pytest.approx(1.1997, abs=1e-4)
    assert F.min().item() == pytest.approx(-1.1997, abs=1e-4)
    edge = 2.3994 / mu
    beyond = w.abs() > edge * (1 + 1e-4)
    assert torch.all(B[beyond] <= 0)
    # strictly negative where sech^2 is still representable next to 1 (tanh rounds to 1 further out)
    assert torch.all(B[beyond & (w.abs() < 12.0 / mu)] < 0)
    assert torch.all(B[w.abs() < edge * (1 - 1e-4)] > 0)
    # the peak of SS sits where SS' changes sign
    assert w[F.argmax()].item() == pytest.approx(edge, abs=1e-4)


# ---- autograd ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("name", [n for n in NAMES if B_IS_DF[n]])
def test_autograd_of_forward_equals_backward(name, progress):
    """For the Corollary 2 pairs, B is exactly F' (autograd through forward_fn itself)."""
    q = get(name).set_progress(progress)
    rng = np.random.default_rng(1)
    w = torch.from_numpy(np.concatenate([rng.uniform(-3, 3, 5000), rng.normal(0, 0.1, 5000)]))
    w.requires_grad_(True)
    (dF,) = torch.autograd.grad(q.forward_fn(w, **q.params).sum(), w)
    torch.testing.assert_close(dF, q.B(w.detach()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rho,varrho", [(0.01, 0.0), (0.3, 0.0), (0.3, 0.4), (0.6, 2.0)])
def test_pc_slopes(rho, varrho):
    """L_rho's derivative on its linear pieces (PC's B = 1 is not F': PC pairs L_rho with identity)."""
    q = get("pc", rho=rho, varrho=varrho)
    q1p, q2m = min(0.0, -1.0 + rho), max(0.0, 1.0 - rho)
    pm, pp = max(-1.0, -varrho), min(1.0, varrho)
    rng = np.random.default_rng(2)
    w = rng.uniform(-3, 3, 20_000)
    w = w[(np.abs(w) > 1e-6) & (np.abs(w - q1p) > 1e-6) & (np.abs(w - q2m) > 1e-6)]
    expected = np.select([w < q1p, w < 0, w < q2m], [0.0, (pm + 1) / -q1p, (1 - pp) / q2m], 0.0)
    wt = torch.from_numpy(w).requires_grad_(True)
    (dF,) = torch.autograd.grad(q.forward_fn(wt, **q.params).sum(), wt)
    np.testing.assert_allclose(dF.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(q.B(wt.detach()), torch.ones_like(wt))


@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("name", NAMES)
def test_call_applies_the_pair(name, progress):
    """q(w) outputs F(w) and sends grad * B(w) to w, with B's parameters frozen at forward time."""
    q = get(name).set_progress(progress)
    torch.manual_seed(3)
    w0 = torch.cat([torch.randn(4000, dtype=torch.float64) * 1.5,
                    torch.tensor([0.0, 1.0, -1.0, 0.5, -0.5], dtype=torch.float64)])
    upstream = torch.randn_like(w0)
    F_expected, B_expected = q.F(w0), q.B(w0)
    w = w0.clone().requires_grad_(True)
    y = q(w)
    assert torch.equal(y.detach(), F_expected)
    q.set_progress(1.0 - progress)  # moving the schedule after the forward must not change the gradient
    y.backward(upstream)
    torch.testing.assert_close(w.grad, upstream * B_expected, rtol=1e-12, atol=0)


# ---- schedules and parameters --------------------------------------------------------------------------

def test_set_progress_moves_schedules():
    q = get("bnn++")  # log-linear 1.25 -> 30.4 (pairs.BNNPlusPlus says why not the paper's linear 5 -> 30)
    assert [q.set_progress(p).params["mu"] for p in (0, 0.5, 1)] == pytest.approx([1.25, (1.25 * 30.4) ** 0.5, 30.4])
    pc = get("pc")
    assert [pc.set_progress(p).params["rho"] for p in (0, 0.5, 1)] == pytest.approx([0.01, 5.005, 10.0])
    ede = get("ede")
    ts = [ede.set_progress(p).params["t"] for p in (0, 0.5, 1)]
    ks = [ede.set_progress(p).params["k"] for p in (0, 0.5, 1)]
    assert ts == pytest.approx([0.1, 1.0, 10.0])
    assert ks == pytest.approx([10.0, 1.0, 1.0])
    assert ede.set_progress(0.25).params["k"] == pytest.approx(1.0 / (0.1 * 100**0.25))


def test_set_progress_returns_the_quantizer():
    q = get("bnn++")
    assert q.set_progress(0.5) is q


@pytest.mark.parametrize("progress", PROGRESS)
def test_keyword_fixes_a_parameter(progress):
    q = get("bnn++", mu=7).set_progress(progress)
    assert q.params == {"mu": 7.0}
    w = torch.linspace(-2, 2, 101, dtype=torch.float64)
    torch.testing.assert_close(q.F(w), torch.from_numpy(np_ss(w.numpy(), 7.0)))
    assert get("pc", rho=0.3).set_progress(progress).params["rho"] == 0.3
    # a fixed t still derives k = max(1/t, 1)
    assert get("ede", t=0.5).set_progress(progress).params == {"t": 0.5, "k": 2.0}


def test_dict_and_schedule_objects_as_parameters():
    from pcpp.schedules import loglinear

    q = get("bnn++", mu={"kind": "linear", "start": 2.0, "end": 4.0})
    assert [q.set_progress(p).params["mu"] for p in (0, 0.5, 1)] == pytest.approx([2.0, 3.0, 4.0])
    q = get("ede+", t=loglinear(1.0, 100.0))
    assert q.set_progress(0.5).params == pytest.approx({"t": 10.0, "k": 1.0})


# ---- PC's L_rho ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("rho", [1.0, 1.5, 10.0])
def test_pc_large_rho_is_sign(rho):
    w = torch.cat([torch.linspace(-3, 3, 6001), torch.tensor([0.0, -0.0])]).double()
    expected = torch.where(w >= 0, 1.0, -1.0).double()
    assert torch.equal(get("pc", rho=rho).F(w), expected)
    assert torch.equal(quantizers.prox_linear(w, rho), expected)


def test_pc_small_rho_is_nearly_identity():
    w = torch.linspace(-0.99, 0.99, 1981, dtype=torch.float64)
    F = get("pc", rho=1e-4).F(w)
    assert (F - w).abs().max().item() < 1e-3
    # beyond +-1 it saturates
    assert get("pc", rho=1e-4).F(torch.tensor([-2.0, 2.0], dtype=torch.float64)).tolist() == [-1.0, 1.0]


@pytest.mark.parametrize("rho,varrho", [(0.3, 0.4), (0.5, 0.2), (0.2, 1.5), (0.8, 0.0)])
def test_pc_varrho_jump_points(rho, varrho):
    q1p, q2m = min(0.0, -1.0 + rho), max(0.0, 1.0 - rho)
    pm, pp = max(-1.0, -varrho), min(1.0, varrho)
    F = get("pc", rho=rho, varrho=varrho).F
    w = torch.tensor([q1p, 0.5 * q1p, -1e-12, 0.0, 1e-12, 0.5 * q2m, q2m, -2.0, 2.0], dtype=torch.float64)
    expected = [-1.0, 0.5 * (pm - 1.0), pm, pp, pp, 0.5 * (pp + 1.0), 1.0, -1.0, 1.0]
    assert F(w).tolist() == pytest.approx(expected, abs=1e-9)
    # the jump at 0 goes from -varrho to +varrho (clipped to [-1, 1])
    assert (F(w)[3] - F(w)[2]).item() == pytest.approx(pp - pm, abs=1e-9)


def test_pc_refuses_negative_rho():
    with pytest.raises(ValueError, match="rho"):
        get("pc", rho=-0.1).F(torch.zeros(3))


# ---- ReAct's learnable threshold -----------------------------------------------------------------------

@pytest.mark.parametrize("channels", [None, 3])
def test_react_learnable_beta_gradient(channels):
    q = get("react", learnable_beta=True, channels=channels).double()
    n_beta = channels or 1
    assert isinstance(q.beta, torch.nn.Parameter) and q.beta.shape == (n_beta,)
    assert [p is q.beta for p in q.parameters()] == [True]
    with torch.no_grad():
        q.beta.copy_(torch.tensor([0.2, -0.5, 1.0][:n_beta], dtype=torch.float64))
    torch.manual_seed(4)
    w = (torch.randn(4, 3, 5, 5, dtype=torch.float64) * 1.5).requires_grad_(True)
    upstream = torch.randn_like(w)
    shape = (1, -1, 1, 1) if channels else ()
    beta = q.beta.detach().reshape(shape)
    x = w.detach() - beta
    y = q(w)
    assert torch.equal(y.detach(), torch.where(x >= 0, 1.0, -1.0).double())
    assert torch.equal(q.F(w.detach()), y.detach())
    y.backward(upstream)
    inside = (x.abs() <= 1).double()
    torch.testing.assert_close(w.grad, upstream * inside)
    dims = (0, 2, 3) if channels else (0, 1, 2, 3)
    torch.testing.assert_close(q.beta.grad, -(upstream * inside).sum(dim=dims).reshape(n_beta))


def test_react_fixed_beta_has_no_parameter():
    q = get("react", beta=0.5)
    assert q.beta is None and list(q.parameters()) == []
    assert q.F(torch.tensor([0.4, 0.5, 0.6])).tolist() == [-1.0, 1.0, 1.0]


# ---- state round trip ----------------------------------------------------------------------------------

def _same_pair(a, b, progress):
    a.set_progress(progress)
    b.set_progress(progress)
    assert a.name == b.name and a.params == b.params
    w = torch.from_numpy(_points(seed=5, n=200))
    assert torch.equal(a.F(w), b.F(w)) and torch.equal(a.B(w), b.B(w))


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip(name):
    q = get(name)
    state = json.loads(json.dumps(q.state()))  # a checkpoint stores it as JSON
    r = from_state(state)
    for p in PROGRESS:
        _same_pair(q, r, p)


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip_with_fixed_parameters(name):
    fixed = get(name).set_progress(0.3).params
    q = get(name, **fixed)
    r = from_state(json.loads(json.dumps(q.state())))
    for p in PROGRESS:
        _same_pair(q, r, p)
        assert r.params == pytest.approx(fixed)


def test_state_round_trip_keeps_options():
    q = get("react", learnable_beta=True, channels=3)
    r = from_state(json.loads(json.dumps(q.state())))
    assert r.opts == {"learnable_beta": True, "channels": 3}
    assert r.beta.shape == (3,)


# ---- bad input -----------------------------------------------------------------------------------------

def test_unknown_quantizer_lists_valid_names():
    with pytest.raises(ValueError) as e:
        get("bnn+++")
    for n in NAMES:
        assert n in str(e.value)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_parameter_lists_valid_parameters(name):
    with pytest.raises(ValueError) as e:
        get(name, not_a_parameter=1.0)
    msg = str(e.value)
    assert "not_a_parameter" in msg
    for p in get(name).params:
        assert p in msg


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), float("inf")])
def test_set_progress_refuses_outside_unit_interval(bad):
    q = get("bnn++")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        q.set_progress(bad)
    assert q.progress == 0.0  # unchanged by the refused call
