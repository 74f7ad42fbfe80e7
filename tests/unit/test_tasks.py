"""The paper's task names (pcpp.tasks): registered once, read back from a spec, refused when unknown."""

import pytest

from pcpp import tasks
from pcpp.layers import BinaryLinear
from pcpp.surgery import BinarizeSpec

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("task", tasks.TASKS)
def test_spec_of_a_task_reads_back_as_that_task(task):
    spec = BinarizeSpec(**tasks.spec(task, "bnn"))
    assert spec.task == task == tasks.task_of(spec.activation, spec.accumulator_bits)
    assert spec.weight == "bnn"
    assert spec.activation == (None if task == tasks.BW else "bnn")
    assert spec.accumulator_bits == (8 if task == tasks.BWAA else None)
    layer = BinaryLinear(4, 2, **tasks.layer_kwargs(task))
    assert (layer.act_quantizer is None) == (task == tasks.BW)
    assert layer.accumulator_bits == spec.accumulator_bits


def test_spec_options():
    s = tasks.spec(tasks.BWA, "bnn++", activation="react", units="raw")
    assert s == {"weight": "bnn++", "activation": "react", "accumulator_bits": None, "units": "raw"}
    with pytest.raises(ValueError, match="BW binarizes weights only"):
        tasks.spec(tasks.BW, activation="bnn")


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown task 'BWAAA' \(did you mean 'BWAA'\?\); valid: BW, BWA, BWAA"):
        tasks.spec("BWAAA")
    assert tasks.check("BWA") == "BWA"
