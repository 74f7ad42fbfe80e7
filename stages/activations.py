"""BWA / BWAA in a training worker: calibrate the activation thresholds, run the balance guard, record its table.

The guard (pcpp.calibration.check_activation_balance) measures, on the first training batch, each binarized
activation's share of inputs below its threshold. A layer with >= 99% on one side has an (almost) constant
honest sign, which carries no information. With `binarize.activation_guard: error` such a run is refused
before DeepSpeed starts: the worker writes the table (`activation_balance.txt` in the run directory and in
MLflow) and ends with status `refused` and the guard's message. It does not raise, so Ray Train does not
retry it (a retry would refuse again). With `warn` the run goes on, tagged `pcpp.activation_guard`.
docs/activations.md.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from pcpp import layers
from pcpp.calibration import BalanceReport, prepare_activations_
from stages.config import TrainConfig
from stages.tracking import Run

CALIBRATION_BATCHES = 4  # training batches the activation thresholds are calibrated on (BWA / BWAA)
BALANCE_FILE = "activation_balance.txt"


def prepare_activations(model, cfg: TrainConfig, loader) -> BalanceReport | None:
    """BWA / BWAA, before training: calibrate the activation thresholds, then measure the balance.

    Thresholds are calibrated at the per-channel median (pcpp.calibration) of the starting network, the
    teacher's (FT) or the random init's (E2E: beta = 0 after a ReLU is one-sided); a pre-trained student
    keeps its own, a resumed run gets its trained ones back from the checkpoint after. Returns the guard's
    report on the first batch (never raises for one-sided layers: `refusal` decides); None for BW and FP.
    The loader is seeded per epoch (set_epoch), so reading a few batches here does not change the training
    order.
    """
    spec = cfg.binarize
    if spec is None or spec.activation is None:
        return None
    batches = list(islice(iter(loader), CALIBRATION_BATCHES))
    return prepare_activations_(model, batches, calibrate=cfg.student is None, strict=False)


def refusal(balance: BalanceReport | None, cfg: TrainConfig) -> tuple[str, BalanceReport] | None:
    """(the message that ends the run, the refusing rank's report) when the guard (activation_guard: error)
    refuses on any rank's first batch, else None. Every rank calls it (one all-gather of the refused reports),
    so that all of them stop together and rank 0 can record the refusing rank's table."""
    import torch.distributed as dist

    if balance is None or cfg.binarize.activation_guard != "error":
        return None
    reports = [balance if balance.refused else None]
    if dist.is_available() and dist.is_initialized():
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, balance if balance.refused else None)
    refused = [(rank, report) for rank, report in enumerate(reports) if report is not None]
    if not refused:
        return None
    rank, report = refused[0]
    where = f" (worker {rank}'s first batch)" if len(reports) > 1 else ""
    return f"refused by the activation guard{where}: {report.error()}", report


def activation_placement(model) -> str | None:
    """The placement the binarized activations resolved to ('auto' becomes hardtanh or threshold)."""
    for _, layer in layers.binary_layers(model):
        if layer.act_quantizer is not None:
            return layer.activation_placement
    return None


def record_balance(balance: BalanceReport, placement: str | None, run_dir: Path, run: Run | None, *,
                   refused: bool = False) -> None:
    """The guard's table beside the run (activation_balance.txt) and in MLflow: the same text, metrics
    act_below_min / act_below_max, tag pcpp.activation_placement, and tag pcpp.activation_guard when some
    layers are one-sided ("refused: ..." or "warn: ..."). A warning is printed in warn mode (a refused run
    ends with the guard's message instead)."""
    text = f"activation_placement: {placement}\n{balance}\n"
    (run_dir / BALANCE_FILE).write_text(text)
    if balance.refused and not refused:
        print(f"warning: {balance.error(warn=True)}", flush=True)
    if run is None:
        return
    run.set_tags({"pcpp.activation_placement": str(placement)})
    run.log_text(text, BALANCE_FILE)
    run.log_metrics({"act_below_min": min(r.below for r in balance.rows),
                     "act_below_max": max(r.below for r in balance.rows)}, step=0)
    if balance.refused:
        run.set_tags({"pcpp.activation_guard": f"{'refused' if refused else 'warn'}: {len(balance.refused)} "
                      "one-sided layers: " + ", ".join(r.name for r in balance.refused)[:4000]})
