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


# -- bad input ends with exit 2 and one line, before Ray or MLflow start (issue 13 item 2, issue 15 item 6) --
def test_a_wrong_type_in_a_train_config_exits_2_before_ray_or_mlflow(tmp_path):
    import subprocess
    import sys

    (tmp_path / "c.yaml").write_text("init: random\nname: 1.10\noptim: {lr: fast, weight_decay: 1e-3}\n"
                                     f"tracking: {{experiment: 2024, run_root: {tmp_path / 'runs'}}}\n")
    code = ("import sys; from pipelines.cli import main; rc = main(sys.argv[1:]); "
            "print('ray imported' if 'ray' in sys.modules else 'ray not imported'); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "train", str(tmp_path / "c.yaml")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"pcpp train: error: {tmp_path / 'c.yaml'}: optim.lr: expected a number, got 'fast'\n"
    assert done.stdout.strip() == "ray not imported"
    assert not (tmp_path / "runs").exists()  # no run directory, no MLflow store


def test_a_sweep_on_a_metric_the_trials_do_not_report_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text("data: {train: a, test: b}\nteacher: {source: file, path: t.th}\n")
    (tmp_path / "s.yaml").write_text("pipeline: p.yaml\nmetric: binary_accuracy\n"
                                     "search: {lr: {low: 1e-4, high: 1e-2}}\n")
    assert main(["sweep", "s.yaml"]) == 2
    err = capsys.readouterr().err
    assert "metric 'binary_accuracy' is not one the trials report (did you mean 'binary_acc'?)" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_an_mlflow_error_exits_2_with_one_line(tmp_path, capsys):
    assert main(["report", "--tracking-uri", "nosuchscheme://x", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pcpp report: MLflow error: ") and "nosuchscheme://x" in err and "\n" not in err


def test_pcpp_train_refuses_a_keep_fp_policy_pointing_to_pcpp_run(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(f"init: random\ntracking: {{run_root: {tmp_path / 'runs'}}}\n")
    assert main(["train", str(tmp_path / "c.yaml"), "binarize.keep_fp={from_sensitivity: 1}"]) == 2
    err = capsys.readouterr().err
    assert "is a policy over a sensitivity scan" in err and "pcpp run" in err and "[layer2.0]" in err, err
    assert not (tmp_path / "runs").exists()  # refused before a run directory or a store
