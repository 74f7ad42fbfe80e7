"""BatchNorm statistics re-estimated under the honest binarized forward (pcpp.calibration.recalibrate_batchnorm_)."""

import pytest
import torch
from torch import nn

import pcpp.layers as pl
from pcpp.calibration import recalibrate_batchnorm_
from pcpp.layers import BinaryConv2d

pytestmark = pytest.mark.unit


def conv_bn(act=None) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(BinaryConv2d(3, 4, 3, bias=False, act_quantizer=act, activation_placement="none"),
                         nn.BatchNorm2d(4))


def batches(n=3, seed=1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, 6, 6, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("act", [None, "bnn++"])
def test_running_stats_are_the_average_of_the_honest_batch_statistics(act):
    model = conv_bn(act)
    pl.set_progress(model, 0.0)  # bnn++ at its softest: the training forward is far from sign
    model.train()
    data = batches()
    conv, bn = model[0], model[1]
    with pl.binary_eval(model), torch.no_grad():
        outs = [conv(x) for x in data]  # the honest conv output, the BatchNorm's input
    want_mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    want_var = torch.stack([o.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True) for o in outs]).mean(0)
    with torch.no_grad():
        soft_mean = conv(data[0]).mean(dim=(0, 2, 3))
    bn.momentum = 0.3
    assert recalibrate_batchnorm_(model, [(x, torch.zeros(5)) for x in data]) == 1
    torch.testing.assert_close(bn.running_mean, want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, want_var, rtol=1e-5, atol=1e-6)
    if act is not None:  # the honest statistics differ from the training forward's
        assert not torch.allclose(bn.running_mean, soft_mean, atol=1e-3)
    # every flag as before: training mode, the training forward, the momentum
    assert model.training and bn.training and not conv.honest and bn.momentum == 0.3


def test_honest_forward_with_recalibrated_stats_is_normalised():
    model = conv_bn("bnn++")
    pl.set_progress(model, 0.0)
    data = batches(4)
    recalibrate_batchnorm_(model, data)
    with pl.binary_eval(model), torch.no_grad():
        y = torch.cat([model(x) for x in data])
    per_channel = y.transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(4), atol=0.05, rtol=0)


def test_reduce_sees_every_statistic_and_its_result_stays():
    model = nn.Sequential(conv_bn("bnn"), nn.ReLU(), BinaryConv2d(4, 4, 3, act_quantizer="bnn",
                                                                   activation_placement="threshold"),
                          nn.BatchNorm2d(4))
    seen = []

    def reduce(t):
        seen.append(t)
        t.fill_(2.0)  # stands in for the average over ranks

    assert recalibrate_batchnorm_(model, batches(), reduce=reduce) == 2
    assert len(seen) == 4
    for bn in (model[0][1], model[3]):
        assert torch.equal(bn.running_mean, torch.full((4,), 2.0))
        assert torch.equal(bn.running_var, torch.full((4,), 2.0))


def test_nothing_changes_without_batches_or_without_batchnorm():
    model = conv_bn("bnn")
    bn = model[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_batchnorm_(model, [])
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert bn.momentum == 0.1
    assert recalibrate_batchnorm_(nn.Sequential(BinaryConv2d(3, 4, 3), nn.LayerNorm(4)), batches()) == 0


def test_a_batchnorm_off_the_eval_path_keeps_its_statistics():
    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.main, self.aux = conv_bn("bnn"), nn.BatchNorm2d(4)  # aux: a branch forward never calls

        def forward(self, x):
            return self.main(x)

    model = WithAux()
    with torch.no_grad():
        model.aux.running_mean.fill_(0.7)
    model.aux.num_batches_tracked.fill_(9)
    assert recalibrate_batchnorm_(model, batches()) == 2
    assert torch.equal(model.aux.running_mean, torch.full((4,), 0.7)) and int(model.aux.num_batches_tracked) == 9
    assert int(model.main[1].num_batches_tracked) == 3


def test_a_half_precision_model_gets_half_inputs():
    model = conv_bn("bnn").to(torch.bfloat16)
    assert recalibrate_batchnorm_(model, batches()) == 1
    assert model[1].running_mean.dtype == torch.bfloat16 and torch.isfinite(model[1].running_var).all()


def _recalibrate_on_rank(rank: int, world: int, store_path: str, out: str, data: list) -> None:
    """One rank of a gloo group: recalibrate on its own batches, averaging over ranks; save the statistics."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        model = conv_bn()

        def average(t: torch.Tensor) -> None:  # what stages.training passes
            dist.all_reduce(t)
            t.div_(world)

        recalibrate_batchnorm_(model, data[rank], reduce=average)
        torch.save({k: v for k, v in model[1].state_dict().items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_different_data_get_the_statistics_of_all_their_batches(tmp_path, monkeypatch):
    """2 processes (gloo on loopback) each recalibrating a BW conv + BatchNorm on their own 2 batches, the
    second rank's shifted and scaled, end with the same statistics, equal to those of one process on all 4
    batches (mean of batch means, mean of unbiased batch variances)."""
    import torch.multiprocessing as mp

    from cluster.train_backend import loopback_interface

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", loopback_interface())
    data = [batches(2, seed=1), [3.0 * x + 2.0 for x in batches(2, seed=2)]]
    mp.spawn(_recalibrate_on_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "bn"), data), nprocs=2)
    ranks = [torch.load(tmp_path / f"bn.{r}", weights_only=True) for r in range(2)]
    for key in ("running_mean", "running_var"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    one = conv_bn()
    recalibrate_batchnorm_(one, data[0] + data[1])
    torch.testing.assert_close(ranks[0]["running_mean"], one[1].running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ranks[0]["running_var"], one[1].running_var, rtol=1e-6, atol=1e-6)
    # the ranks' means differ widely: a reduction of second moments would not match one process
    per_rank = [conv_bn() for _ in data]
    for model, own in zip(per_rank, data):
        recalibrate_batchnorm_(model, own)
    means = torch.stack([m[1].running_mean for m in per_rank])
    assert (means[1] - means[0]).abs().min() > 0.5 * one[1].running_var.sqrt().min()
