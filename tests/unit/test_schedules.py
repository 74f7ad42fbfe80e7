"""Schedules: pure functions of progress in [0, 1], serialisable, strict about their inputs."""

import json
import math

import pytest

from pcpp import schedules
from pcpp.schedules import KINDS, Schedule, as_schedule, check_progress, constant, linear, loglinear

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "sched,expected",
    [
        (constant(3.0), (3.0, 3.0, 3.0)),
        (linear(5.0, 30.0), (5.0, 17.5, 30.0)),
        (linear(10.0, 0.01), (10.0, 5.005, 0.01)),  # decreasing ramps are allowed
        (loglinear(0.1, 10.0), (0.1, 1.0, 10.0)),
        (loglinear(0.01, 10.0), (0.01, 0.01 * 1000**0.5, 10.0)),
    ],
    ids=str,
)
def test_values_at_0_half_1(sched, expected):
    assert [sched(p) for p in (0.0, 0.5, 1.0)] == pytest.approx(expected, rel=1e-12)


def test_end_points_are_exact():
    # the value at progress 1 is the end point itself (a ramp must reach its target)
    assert linear(0.01, 10.0)(1.0) == 10.0
    assert loglinear(0.1, 10.0)(0.0) == 0.1
    assert loglinear(0.1, 10.0)(1.0) == pytest.approx(10.0, rel=1e-15)


def test_loglinear_is_linear_in_log():
    s = loglinear(0.1, 10.0)
    ps = [i / 20 for i in range(21)]
    logs = [math.log10(s(p)) for p in ps]
    assert logs == pytest.approx([-1 + 2 * p for p in ps], abs=1e-12)


def test_constant_ignores_end():
    s = Schedule("constant", 2.0, 99.0)
    assert s(0.0) == s(1.0) == 2.0 and s.end == 2.0


def test_integer_end_points_become_floats():
    s = linear(1, 3)
    assert isinstance(s(0.5), float) and s(0.5) == 2.0


@pytest.mark.parametrize("sched", [constant(2.0), linear(5, 30), loglinear(0.1, 10)], ids=str)
def test_round_trip_gives_the_same_values(sched):
    d = json.loads(json.dumps(sched.to_dict()))  # as saved with a checkpoint
    resumed = Schedule.from_dict(d)
    assert resumed == sched
    for i in range(11):
        assert resumed(i / 10) == sched(i / 10)
    assert as_schedule(d) == sched


def test_from_dict_constant_needs_no_end():
    assert Schedule.from_dict({"kind": "constant", "start": 4.0})(0.7) == 4.0


def test_as_schedule_coercions():
    assert as_schedule(3) == constant(3.0)
    assert as_schedule(2.5)(1.0) == 2.5
    s = linear(1.0, 2.0)
    assert as_schedule(s) is s
    for bad in ("fast", None, [1, 2], True):
        with pytest.raises(ValueError, match="schedule"):
            as_schedule(bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_end_points_refused(kind, bad):
    with pytest.raises(ValueError, match="finite"):
        Schedule(kind, bad, 1.0)
    if kind != "constant":
        with pytest.raises(ValueError, match="finite"):
            Schedule(kind, 1.0, bad)


@pytest.mark.parametrize("start,end", [(0.0, 10.0), (-1.0, 10.0), (0.1, 0.0), (0.1, -5.0)])
def test_loglinear_needs_positive_end_points(start, end):
    with pytest.raises(ValueError, match="positive"):
        loglinear(start, end)
    linear(start, end)  # fine for a linear ramp


@pytest.mark.parametrize("bad", [-0.01, 1.01, 2, float("nan"), float("inf"), -float("inf")])
def test_progress_outside_unit_interval_refused(bad):
    for s in (constant(1.0), linear(0.0, 1.0), loglinear(0.1, 10.0)):
        with pytest.raises(ValueError, match=r"progress must lie in \[0, 1\]"):
            s(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_progress(bad)


def test_progress_accepts_the_closed_interval():
    assert check_progress(0) == 0.0 and check_progress(1) == 1.0


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError) as e:
        Schedule("cosine", 1.0, 2.0)
    for kind in KINDS:
        assert kind in str(e.value)
    with pytest.raises(ValueError, match="linear"):
        Schedule.from_dict({"kind": "exp", "start": 1.0, "end": 2.0})


def test_unknown_keys_listed_with_valid_keys():
    with pytest.raises(ValueError) as e:
        Schedule.from_dict({"kind": "linear", "start": 1.0, "end": 2.0, "stop": 3.0})
    msg = str(e.value)
    assert "stop" in msg and all(k in msg for k in ("kind", "start", "end"))


def test_missing_keys_refused():
    with pytest.raises(ValueError, match="kind"):
        Schedule.from_dict({"start": 1.0})


def test_schedule_is_immutable():
    s = linear(1.0, 2.0)
    with pytest.raises(AttributeError):
        s.start = 3.0  # frozen: a schedule never changes under a running job


def test_helpers_build_the_named_kinds():
    assert schedules.constant(1.0).kind == "constant"
    assert schedules.linear(1.0, 2.0).kind == "linear"
    assert schedules.loglinear(1.0, 2.0).kind == "loglinear"
    assert str(linear(5, 30)) == "linear 5 -> 30"


def test_progress_at_runs_the_first_step_at_start_and_the_last_at_end():
    from pcpp.schedules import progress_at

    assert progress_at(0, 10) == 0.0
    assert progress_at(9, 10) == 1.0
    assert progress_at(3, 7) == pytest.approx(0.5)
    assert progress_at(20, 10) == 1.0  # past the end stays at the end
    assert progress_at(0, 1) == 0.0 and progress_at(0, 0) == 0.0
    with pytest.raises(ValueError, match="step=-1"):
        progress_at(-1, 10)


def test_learning_rate_cosine_and_constant():
    from pcpp.schedules import LR_SCHEDULES, learning_rate

    assert LR_SCHEDULES == ("cosine", "constant")
    assert learning_rate(0.1, 0.0) == 0.1 and learning_rate(0.1, 1.0) == 0.0
    assert learning_rate(0.1, 0.5) == pytest.approx(0.05)
    assert learning_rate(0.1, 0.25) == pytest.approx(0.05 * (1 + math.sqrt(0.5)))
    assert learning_rate(0.1, 0.7, "constant") == 0.1
    with pytest.raises(ValueError, match="valid: cosine, constant"):
        learning_rate(0.1, 0.5, "step")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        learning_rate(0.1, 1.5)
