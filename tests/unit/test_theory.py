"""Corollaries 1 and 2 (paper section 3.1, Appendix C): `check` verdicts, recovered T and P, `legitimize`."""

import contextlib

import numpy as np
import pytest
import torch

from pcpp import quantizers
from pcpp.quantizers import get, names
from pcpp.theory import Verdict, check, legitimize

pytestmark = pytest.mark.unit

NAMES = names()
PROGRESS = (0.0, 0.25, 0.5, 0.75, 1.0)

# The expected verdicts (Corollary 1), at every progress
ADMISSIBLE = {
    "fp": True, "bc": True, "pc": True, "bnn": True, "bnn+": False, "bnn++": True,
    "poly": False, "poly+": True, "rbnn": False, "ede": False, "ede+": True, "react": True,
}
ADMISSIBLE_NAMES = [n for n in NAMES if ADMISSIBLE[n]]


def test_expected_verdicts_cover_the_registry():
    assert set(ADMISSIBLE) == set(NAMES)


@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("name", NAMES)
def test_verdict(name, progress):
    v = check(name, progress=progress)
    assert isinstance(v, Verdict)
    assert v.admissible is ADMISSIBLE[name], str(v)
    assert bool(v) is ADMISSIBLE[name]
    # a reason a person can read: a sentence, not a code
    assert isinstance(v.reason, str) and len(v.reason.split()) >= 5
    text = str(v)
    assert name in text and ("NOT admissible" in text) is (not ADMISSIBLE[name])
    # the verdict records the parameters it was taken at
    assert v.params == get(name).set_progress(progress).params


@pytest.mark.parametrize("name", NAMES)
def test_check_accepts_a_built_quantizer(name):
    q = get(name).set_progress(0.5)
    assert check(q).admissible is ADMISSIBLE[name]


@pytest.mark.parametrize("name", [n for n in NAMES if not ADMISSIBLE[n]])
def test_not_admissible_has_no_T_or_P(name):
    v = check(name)
    with pytest.raises(ValueError, match="not admissible"):
        v.P(0.5)
    with pytest.raises(ValueError, match="not admissible"):
        v.T(0.5)


def _eq9(w, mu):
    """The paper's eq. (9): BNN's proximal quantizer."""
    return np.where(np.abs(w) > 1, w / mu + np.sign(w) * (1 - 1 / mu), np.sign(w))


@pytest.mark.parametrize("mu", [2.0, 4.0])
def test_bnn_recovers_eq_8_and_9(mu):
    v = check("bnn", free_slope=1.0 / mu)
    assert v.admissible
    w = np.linspace(-3, 3, 60_001)
    w = w[(np.abs(w) > 1e-3) & (np.abs(np.abs(w) - 1) > 1e-3)]
    np.testing.assert_allclose(v.P(w), _eq9(w, mu), atol=1e-4)
    # eq. (8): T is the hard tanh, on the whole range of P (including the jump's gap (-1, 1))
    lo, hi = v.P_values.min(), v.P_values.max()
    assert lo == pytest.approx(-1 - 2 / mu, abs=1e-3) and hi == pytest.approx(1 + 2 / mu, abs=1e-3)
    p = np.linspace(lo, hi, 10_001)
    np.testing.assert_allclose(v.T(p), np.clip(p, -1, 1), atol=1e-4)


def _away_from_jumps(q, w):
    """Drop points within 1e-3 of a jump of F (T o P is only defined up to the jump's gap there)."""
    eps = 1e-3
    Fl, Fr = q.F(torch.from_numpy(w - eps)), q.F(torch.from_numpy(w + eps))
    return w[(Fr - Fl).abs().numpy() < 0.5]


@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("name", ADMISSIBLE_NAMES)
def test_T_of_P_is_F(name, progress):
    q = get(name).set_progress(progress)
    v = check(q)
    rng = np.random.default_rng(0)
    w = _away_from_jumps(q, rng.uniform(-2.9, 2.9, 5000))
    np.testing.assert_allclose(v.T(v.P(w)), q.F(torch.from_numpy(w)).numpy(), atol=1e-4)


@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("name", ADMISSIBLE_NAMES)
def test_P_is_monotone(name, progress):
    v = check(name, progress=progress)
    assert np.all(np.diff(v.P_values) >= -1e-12)
    assert v.P_values[-1] > v.P_values[0]


@pytest.mark.parametrize("name", ["fp", "bnn++", "poly+", "ede+"])
def test_corollary_2_pairs_have_identity_P(name):
    """B = F' makes P(w) = w (Corollary 2), up to the constant fixed by P(0) = 0."""
    if name not in NAMES:
        pytest.fail(f"{name} is no longer registered")
    v = check(name, progress=0.3)
    w = np.linspace(-2.5, 2.5, 501)
    # poly+ has B = 0 outside |k w| <= 1, where P is free (slope 1 by default): still w
    np.testing.assert_allclose(v.P(w), w, atol=1e-3)


# ---- Corollary 2: legitimize --------------------------------------------------------------------------

W = torch.linspace(-3, 3, 6001, dtype=torch.float64)


def _hardtanh(w):
    return w.clamp(-1.0, 1.0)


def _rbnn_primitive(t: float, k: float):
    """The centred primitive of R-BNN's k max(0, sqrt2 t - t^2 |w|): odd, +-k outside |w| <= sqrt2 / t."""

    def F(w):
        m = w.abs().clamp(max=2**0.5 / t)
        return k * torch.sign(w) * (2**0.5 * t * m - 0.5 * t * t * m * m)

    return F


# What legitimize(name) must give, from the pair's parameters at a progress: a closed form or a registered
# pair's F; None where B does not vanish at +-inf and legitimize refuses. Centred: F(-inf) = -F(+inf).
EXPECTED_LEGIT = {
    "fp": None,
    "bc": None,
    "pc": None,
    "bnn": lambda p: _hardtanh,
    "react": lambda p: _hardtanh,
    "bnn+": lambda p: get("bnn++", mu=p["mu"]).F,
    "bnn++": lambda p: get("bnn++", mu=p["mu"]).F,
    "poly": lambda p: get("poly+", k=1.0).F,
    "poly+": lambda p: get("poly+", k=p["k"]).F,
    "rbnn": lambda p: _rbnn_primitive(p["t"], p["k"]),
    "ede": lambda p: get("ede+", t=p["t"]).F,
    "ede+": lambda p: get("ede+", t=p["t"]).F,
}


def test_expected_legit_covers_the_registry():
    assert set(EXPECTED_LEGIT) == set(NAMES)


@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("name", NAMES)
def test_legitimize_pins_the_centred_primitive(name, progress):
    """legitimize(ede) = ede+ and legitimize(rbnn) = its odd primitive at every progress, bnn+ -> bnn++,
    poly -> poly+ (k = 1), the Corollary 2 pairs unchanged; pairs whose B never vanishes are refused."""
    q = get(name).set_progress(progress)
    if EXPECTED_LEGIT[name] is None:
        with pytest.raises(ValueError, match="unbounded"):
            legitimize(get(name).set_progress(progress))
        return
    expected = EXPECTED_LEGIT[name](q.params)
    L = legitimize(name).set_progress(progress)
    scale = max(1.0, q.params.get("k", 1.0))
    assert (L.F(W) - expected(W)).abs().max().item() < 2e-4 * scale
    assert torch.equal(L.B(W), q.B(W))


@pytest.mark.parametrize(
    "name,progress,ends",
    [
        # ede/ede+: t = 0.1 * 100^p, k = max(1/t, 1): F runs from -k to k through 0
        ("ede", 0.0, 10.0), ("ede", 0.25, 10**0.5), ("ede", 0.5, 1.0), ("ede", 1.0, 1.0),
        ("ede+", 0.0, 10.0),
        # rbnn: t = 10^(-2 + 3p), int B = 2k
        ("rbnn", 0.0, 100.0), ("rbnn", 0.5, 10**0.5), ("rbnn", 1.0, 1.0),
        ("bnn+", 0.0, 1.0), ("bnn++", 1.0, 1.0), ("poly", 0.0, 1.0), ("poly+", 1.0, 1.0),
        ("bnn", 0.5, 1.0), ("react", 0.5, 1.0),
    ],
)
def test_legitimize_values_at_minus_inf_zero_plus_inf(name, progress, ends):
    # the old normalisation F(-inf) = -1 gave (-1, 9, 19) for ede and F(0) = 99 for rbnn at progress 0
    L = legitimize(name).set_progress(progress)
    F = L.F(torch.tensor([-1e4, 0.0, 1e4], dtype=torch.float64)).tolist()
    assert F == pytest.approx([-ends, 0.0, ends], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("mu", [2.0, 5.0, 30.0])
def test_legitimize_bnn_plus_is_bnn_plus_plus(mu):
    L = legitimize("bnn+", mu=mu)
    q = get("bnn++", mu=mu)
    assert (L.F(W) - q.F(W)).abs().max().item() < 1e-4
    assert torch.equal(L.B(W), q.B(W))


@pytest.mark.parametrize("t", [0.1, 0.2, 0.5, 1.0, 2.0, 10.0])
def test_legitimize_ede_is_ede_plus(t):
    # k = max(1/t, 1): the centred primitive of k t (1 - tanh^2(t w)) is k tanh(t w), for t below 1 too
    L = legitimize("ede", t=t)
    assert (L.F(W) - get("ede+", t=t).F(W)).abs().max().item() < 1e-4 * max(1.0, 1.0 / t)


@pytest.mark.parametrize("k", [1.0, 4.0, 30.0])
def test_legitimize_poly_plus_is_itself(k):
    assert (legitimize("poly+", k=k).F(W) - get("poly+", k=k).F(W)).abs().max().item() < 1e-4 * k


def test_legitimize_follows_progress():
    L = legitimize("ede")
    for p in (0.0, 1.0, 0.25, 0.0):
        L.set_progress(p)
        assert (L.F(W) - get("ede+").set_progress(p).F(W)).abs().max().item() < 1e-3


def _vanishes_at_infinity(q) -> bool:
    return bool(torch.all(q.B(torch.tensor([-1e4, 1e4], dtype=torch.float64)) == 0))


@pytest.mark.parametrize("name", [n for n in NAMES if not ADMISSIBLE[n]])
def test_legitimize_repairs_the_inadmissible_pairs(name):
    # every pair the paper rejects has a B of bounded support: Corollary 2 applies to it
    assert _vanishes_at_infinity(get(name))
    assert check(legitimize(name)).admissible


@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("name", NAMES)
def test_legitimized_pairs_are_admissible_and_centred(name, progress):
    """Corollary 2: (int B, B) is admissible whenever B vanishes at +-inf; otherwise legitimize refuses.
    F(-inf) = -F(+inf), and where B is even, F is odd."""
    if not _vanishes_at_infinity(get(name).set_progress(progress)):
        with pytest.raises(ValueError, match="unbounded"):
            legitimize(name).set_progress(progress).F(W)
        return
    L = legitimize(name).set_progress(progress)
    lo, hi = L.F(torch.tensor([-1e4, 1e4], dtype=torch.float64)).tolist()
    assert lo == pytest.approx(-hi, abs=1e-9) and hi > 0
    if torch.equal(L.B(W), L.B(-W)):
        assert (L.F(W) + L.F(-W)).abs().max().item() < 1e-9 * max(1.0, hi)
    v = check(L)
    assert v.admissible, str(v)


def test_legitimize_centres_an_uneven_B():
    # B = 1 on [0, 2]: int B = 2, so F runs from -1 (w <= 0) to +1 (w >= 2), F(1) = 0
    L = legitimize(lambda w: ((w >= 0) & (w <= 2)).to(w.dtype))
    assert (L.F(W) - (W.clamp(0, 2) - 1)).abs().max().item() < 2e-4
    # B = 3 on [-1, 0]: int B = 3, F from -1.5 to 1.5, F(-0.5) = 0
    L = legitimize(lambda w: 3.0 * ((w >= -1) & (w <= 0)).to(w.dtype))
    assert (L.F(W) - (3 * W.clamp(-1, 0) + 1.5)).abs().max().item() < 6e-4
    assert check(L).admissible


def test_legitimize_callable():
    L = legitimize(lambda w: (w.abs() <= 1).to(w.dtype))  # the centred primitive: the hard tanh
    assert (L.F(W) - W.clamp(-1, 1)).abs().max().item() < 2e-4
    v = check(L)
    assert v.admissible, str(v)


def test_legitimized_pair_applies_with_autograd():
    L = legitimize("bnn+", mu=5.0)
    w = torch.linspace(-2, 2, 101, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(101, dtype=torch.float64)
    y = L(w)
    torch.testing.assert_close(y.detach(), L.F(w.detach()))
    y.backward(upstream)
    torch.testing.assert_close(w.grad, upstream * L.B(w.detach()))


def test_legitimize_fp_refused():
    # B = 1 does not vanish at +-inf: the primitive is unbounded, Corollary 2 does not apply. The refusal
    # belongs to legitimize itself, not to the first later call of F.
    with pytest.raises(ValueError, match="unbounded"):
        legitimize("fp")
    with pytest.raises(ValueError, match="unbounded"):
        legitimize(lambda w: torch.ones_like(w))


def test_legitimize_refuses_parameters_with_a_built_quantizer():
    with pytest.raises(ValueError):
        legitimize(get("bnn+"), mu=3.0)


def test_custom_pair_with_B_zero_under_a_jump():
    v = check(quantizers.sign, lambda w: (w.abs() > 0.5).to(w.dtype))
    assert not v.admissible
    assert "B = 0" in v.reason


def test_check_bad_input():
    with pytest.raises(ValueError, match="valid"):
        check("nope")
    with pytest.raises(ValueError, match="callable"):
        check(42)
    with pytest.raises(ValueError, match="domain"):
        check("bnn", domain=(0.5, 3.0))


# ---- a legitimized pair inside a binarized layer --------------------------------------------------------------
@pytest.mark.parametrize("kernel_mode", [None, "reference"])
@pytest.mark.parametrize("name, twin", [("bnn+", "bnn++"), ("ede", "ede+")])
def test_legitimized_pair_trains_inside_a_binarized_layer(name, twin, kernel_mode):
    """BinaryConv2d with legitimize(name) for weights and activations (threshold placement) runs forward and
    backward, fused path or reference alike, and matches the layer built with the registered Corollary 2 twin
    (legitimize(bnn+) = bnn++, legitimize(ede) = ede+) up to the primitive's tabulation."""
    from pcpp import kernels
    from pcpp.layers import BinaryConv2d

    params = {"mu": 5.0} if name == "bnn+" else {"t": 0.7}
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    results = []
    for q in (legitimize(name, **params), get(twin, **params)):
        torch.manual_seed(1)
        layer = BinaryConv2d(3, 4, 3, weight_quantizer=q, act_quantizer=q).double()
        with torch.no_grad():
            layer.act_threshold.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
        xi = x.clone().requires_grad_(True)
        with kernels.using(kernel_mode) if kernel_mode else contextlib.nullcontext():
            out = layer(xi)
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads = [xi.grad, layer.weight.grad, layer.act_threshold.grad]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
        results.append([out.detach(), *grads])
    for got, want in zip(*results):
        assert (got - want).abs().max().item() < 1e-3 * max(1.0, want.abs().max().item())
