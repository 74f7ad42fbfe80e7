"""More Train workers than the Ray cluster has CPUs: refused at once, one line, no run started (issue 13 item 4)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_more_workers_than_cpus_is_refused_naming_what_was_asked_and_what_exists(local_ray, tmp_path, capsys):
    from conftest import make_image_folder

    from pipelines.cli import main
    from stages.data import prepare

    cpus = int(local_ray.cluster_resources()["CPU"])
    gpus = int(local_ray.cluster_resources().get("GPU", 0))
    n = max(cpus, gpus) + 1
    # Shards enough for that many workers (one image each), so that only the resources are short.
    for split in ("train", "test"):
        prepare(make_image_folder(tmp_path / "img" / split, n, classes=1), tmp_path / split, shard_size=1,
                progress=False)
    (tmp_path / "c.yaml").write_text(
        f"init: random\nmodel: {{name: resnet20, num_classes: 1}}\n"
        f"data: {{train: {tmp_path / 'train'}, test: {tmp_path / 'test'}}}\n"
        f"tracking: {{run_root: {tmp_path / 'runs'}}}\n")
    for workers, gpu, have in ((cpus + 1, False, f"{cpus} CPU"), (gpus + 1, True, f"{gpus} GPU")):
        args = [f"distributed.num_workers={workers}", f"distributed.use_gpu={str(gpu).lower()}",
                f"data.batch_size={workers}"]
        assert main(["train", str(tmp_path / "c.yaml"), *args]) == 2
        err = capsys.readouterr().err
        asked = f"{workers} GPU" if gpu else f"{workers} CPU"
        assert err == (f"pcpp train: error: distributed.num_workers={workers}{' with use_gpu' if gpu else ''} asks "
                       f"for {asked}; the Ray cluster has {have} in all\n")
        assert not (tmp_path / "runs").exists()  # no run directory, no MLflow run
