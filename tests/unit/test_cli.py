"""The `pcpp` command line: listing the pairs, checking one, plotting, and refusing unknown names."""

import pytest

from pcpp.quantizers import names
from pipelines.cli import main

pytestmark = pytest.mark.unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_quantizers_lists_every_registered_pair(capsys):
    assert main(["quantizers"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for name in names():
        assert name in rows, name
        assert "admissible" in rows[name] or "depends on progress" in rows[name]


def test_check_writes_a_png(tmp_path, capsys):
    path = tmp_path / "b.png"
    assert main(["check", "bnn", "--plot", str(path)]) == 0
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    out = capsys.readouterr().out
    assert "bnn" in out and "admissible" in out


def test_check_with_parameters_and_strict(capsys):
    assert main(["check", "bnn+", "-p", "mu=5", "--progress", "0.5"]) == 0
    assert "NOT admissible" in capsys.readouterr().out
    assert main(["check", "bnn+", "--strict"]) == 1
    assert main(["check", "bnn++", "--strict", "--progress", "1"]) == 0


def test_check_unknown_name(capsys):
    assert main(["check", "nope"]) == 2
    err = capsys.readouterr().err
    for n in names():
        assert n in err


def test_check_bad_progress_and_parameter(capsys):
    assert main(["check", "bnn++", "--progress", "1.5"]) == 2
    assert "[0, 1]" in capsys.readouterr().err
    assert main(["check", "bnn++", "-p", "nu=3"]) == 2
    assert "mu" in capsys.readouterr().err


def test_bad_plot_suffix(tmp_path, capsys):
    assert main(["check", "bnn", "--plot", str(tmp_path / "b.jpg")]) == 2
    assert ".png" in capsys.readouterr().err
