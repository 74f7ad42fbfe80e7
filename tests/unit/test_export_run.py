"""`pcpp export RUN_DIR OUT` (stages.export.export_run): a `pcpp train` run's final network, rebuilt from the
run's config.yaml and final/model.pt, exported at 1 bit per weight; the reloaded file scores what the run's
honest evaluation scored (new-user trial of issue 8: there was no way from a run directory to an export)."""

from __future__ import annotations

import engine_fixtures  # noqa: E402  (tests/unit on sys.path, pytest's rootdir-less import mode)
import pytest

from pipelines.cli import main

shards, process_group = engine_fixtures.shards, engine_fixtures.process_group  # the fixtures these tests use

pytestmark = pytest.mark.unit


def test_export_of_a_finished_run_scores_what_the_run_scored(shards, process_group, tmp_path, capsys):
    from stages.config import TrainConfig, build
    from stages.export import export_run
    from stages.training import TrainingRun

    train, test = shards
    cfg = build(TrainConfig, {
        "name": "exp", "init": "random", "model": {"name": "resnet20", "num_classes": 4},
        "data": {"train": str(train), "test": str(test), "batch_size": 8, "epoch_length": 16},
        "binarize": {"weight": "bnn++", "activation": "bnn++", "activation_placement": "hardtanh"},
        "algorithm": {"bn_recalibration_batches": 1}, "optim": {"name": "sgd", "lr": 0.05, "epochs": 1},
        "distributed": {"num_workers": 1}, "tracking": {"run_root": str(tmp_path)}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(cfg.to_yaml())  # as stages.engine.fit writes it
    run = TrainingRun(cfg, run_dir)
    assert run.run() == "finished"

    res = export_run(run_dir, tmp_path / "out" / "model.safetensors")
    assert res["round_trip_error"] == 0.0 and res["images"] == 16
    assert res["reloaded_acc"] == pytest.approx(run.metrics["binary_acc"])  # the honest network, reloaded
    assert res["summary"].binary_params > 0 and (tmp_path / "out" / "model.json").exists()

    assert main(["export", str(run_dir), str(tmp_path / "cli.safetensors"), "--eval-limit", "8"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert "reloaded logits equal the binarized-eval model's; on 8 test images: binarized-eval accuracy" in last
    assert main(["export", str(run_dir), str(tmp_path / "cli.pt")]) == 2  # not a .safetensors name
    assert "OUT must end in .safetensors" in capsys.readouterr().err


def test_export_of_a_run_without_a_final_network_names_the_missing_file(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("name: x\n")
    assert main(["export", str(tmp_path), str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'final' / 'model.pt'} does not exist" in err and "pcpp train" in err


def test_export_of_a_run_that_ended_without_a_network_says_how_it_ended(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("name: x\n")
    (tmp_path / "result.json").write_text('{"status": "refused", "message": "refused by the activation guard: ..."}')
    assert main(["export", str(tmp_path), str(tmp_path / "m.safetensors")]) == 2
    assert "the run ended 'refused': refused by the activation guard" in capsys.readouterr().err
