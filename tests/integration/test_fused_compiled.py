"""The compiled fused kernels (torch.compile) against the reference path, over the registry and a BWAA layer.

Integration tier: each kernel compiles in seconds (about a minute cold on 2 busy cores). The comparisons are
tests/unit/test_fused.py's. Compiled kernels round differently from the eager ops (Inductor's tanh is not
ATen's, by one ulp near saturation), and bnn++'s float32 formulas cancel there (sech^2 = 1 - tanh^2 near 0,
times mu (1 - a tanh), up to ~900 at mu = 30): the reference itself is off its float64 value by up to ~1e-4 in
B, more than 1e-6. So compiled results must agree with the reference to 1e-6 (relative to the largest
magnitude) plus twice the reference's own rounding error, measured on the same inputs in float64: as accurate
as the reference, not equal to its roundings. Where torch.compile does not work, the kernels fall back to
eager (checked, then the test is skipped saying why).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pcpp import kernels, quantizers

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location("fused_cases", Path(__file__).parents[1] / "unit" / "test_fused.py")
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)


def skip_without_compiler():
    failures = kernels.compile_failures()
    if failures:
        pytest.skip(f"torch.compile does not work here, the kernels ran eagerly: {failures}")


def test_compiled_default_pair_and_wrap_equal_reference():
    """bnn++ (BWA / BWAA's default pair) with a threshold and as a scaled weight pair, and a BWAA layer (the
    wrap), as in training."""
    q = quantizers.get("bnn++")
    for p in (0.0, 1.0):
        cases.compare(q.set_progress(p), "threshold_conv", "compile")
        cases.compare(q, "weight_scaled", "compile")
    cases.compare_layer("conv_bwaa_layer", "compile", 0.5)
    skip_without_compiler()


@pytest.mark.parametrize("name", quantizers.names())
def test_compiled_pairs_equal_reference(name):
    """Every registered pair's compiled kernels (forward and backward) as an activation pair with a threshold,
    at 3 progress values (tolerance as above); the scale steps are the same code for every pair (checked on
    bnn++ above)."""
    q = quantizers.get(name)
    for p in cases.PROGRESS:
        cases.compare(q.set_progress(p), "threshold_conv", "compile")
    skip_without_compiler()
