"""Blocks of the sensitivity scan: the include patterns binarize_ takes, one per block of Figure 3."""

import pytest
import torch
from torch import nn

from pcpp import models
from pcpp.sensitivity import blocks, scan
from pcpp.surgery import binarize_
from stages.plots import _layout, heatmap

pytestmark = pytest.mark.unit

# (model, create kwargs, number of blocks, build on the meta device: structure only, no init cost)
CASES = [
    ("resnet20", {}, 9, False),
    ("deit_tiny_patch16_224", {"num_classes": 10, "img_size": 32, "patch_size": 4}, 24, True),
    ("resnet18", {"num_classes": 10}, 8, True),
    ("swin_tiny_patch4_window7_224", {}, 2 * (2 + 2 + 6 + 2), True),
]


def _build(name, kwargs, meta):
    if meta:
        with torch.device("meta"):
            return models.create(name, **kwargs)
    return models.create(name, **kwargs)


@pytest.mark.parametrize("name, kwargs, count, meta", CASES, ids=[c[0] for c in CASES])
def test_each_block_binarizes_its_own_layers(name, kwargs, count, meta):
    model = _build(name, kwargs, meta)
    patterns = blocks(model)
    assert len(patterns) == count == len(set(patterns))
    seen: set[str] = set()
    for pattern in patterns:
        # on one model in turn: each report lists only the layers this pattern newly binarized
        report = binarize_(model, {"include": [pattern]})
        assert report.binarized, f"{pattern} binarizes nothing"
        assert all(n == pattern or n.startswith(pattern + ".") for n in report.binarized)
        assert not seen & set(report.binarized), f"{pattern} overlaps an earlier block"
        seen |= set(report.binarized)
    # what the default spec keeps as first layer and head was in no block
    rest = binarize_(model, {})
    kept = {r.name for r in rest.rows if r.action in ("kept (first layer)", "kept (head)")}
    assert len(kept) == 2


def test_expected_names():
    assert blocks(models.create("resnet20")) == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    with torch.device("meta"):
        vit = models.create("deit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4)
        swin = models.create("swin_tiny_patch4_window7_224")
    assert blocks(vit) == [f"blocks.{i}.{p}" for i in range(12) for p in ("attn", "mlp")]
    assert blocks(swin)[:3] == ["layers.0.blocks.0.attn", "layers.0.blocks.0.mlp", "layers.0.blocks.1.attn"]
    assert blocks(swin)[-1] == "layers.3.blocks.1.mlp"


def _unit(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


class _Plain(nn.Module):
    """No transformer blocks, no ResNet names: the generic rule (children of the main container)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.body = nn.Sequential(_unit(8, 8), _unit(8, 8), nn.ReLU(), _unit(8, 8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_generic_fallback_skips_first_layer_and_head():
    assert blocks(_Plain()) == ["body.0", "body.1", "body.3"]
    # a Sequential model whose first child is the first layer: that child is no block
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), _unit(8, 8), _unit(8, 8), nn.Flatten(), nn.Linear(8, 10))
    assert blocks(seq) == ["1", "2"]


def test_no_blocks_is_an_error():
    with pytest.raises(ValueError, match="no blocks"):
        blocks(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 10)))


def test_layout_in_the_manner_of_figure_3():
    rows, cols, cells = _layout([f"blocks.{i}.{p}" for i in range(12) for p in ("attn", "mlp")])
    assert rows == ["attn", "mlp"] and cols == [str(i) for i in range(12)]
    assert cells["blocks.5.mlp"] == (1, 5)
    rows, cols, cells = _layout(["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer2.2"])
    assert rows == ["layer1", "layer2"] and cols == ["0", "1", "2"] and cells["layer2.2"] == (1, 2)
    rows, cols, _ = _layout(["features.3", "classifier"])
    assert rows == [""] and cols == ["features.3", "classifier"]


def test_heatmap_writes_a_png(tmp_path):
    rows = [{"block": f"blocks.{i}.{p}", "drop_ptb": 0.01 * i + (0.05 if p == "mlp" else 0), "drop_bat": 0.0}
            for i in range(4) for p in ("attn", "mlp")]
    path = heatmap(rows, tmp_path / "h.png", "toy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_scan_rows():
    def factory():
        torch.manual_seed(0)
        return _Plain()

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 10, 10, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    rows = scan(factory, ["body.0", "body.3"], batches, bat_loader=batches, bat_steps=3, lr=1e-3)
    assert [r["block"] for r in rows] == ["body.0", "body.3"]
    assert rows[0]["acc_fp"] == rows[1]["acc_fp"]
    for r in rows:
        assert r["layers_binarized"] == 1 and r["params_binarized"] == 8 * 8 * 9 + 8  # weight and bias
        assert r["drop_ptb"] == pytest.approx(r["acc_fp"] - r["acc_ptb"])
        assert r["drop_bat"] == pytest.approx(r["acc_fp"] - r["acc_bat"])
    with pytest.raises(ValueError, match="bat_loader"):
        scan(factory, ["body.0"], batches, bat_steps=1)


def test_bwa_scan_calibrates_thresholds_on_the_given_batches(monkeypatch):
    """A BWA scan of a post-ReLU block (threshold placement on a plain model) sets beta at the channel median
    of the block's input before PTB, so that its honest sign is not constant; without batches it refuses."""
    import pcpp.sensitivity as sens

    def factory():
        torch.manual_seed(0)
        return _Plain()

    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 3, 10, 10, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    seen = []

    def accuracy(model, loader, device):  # records what PTB evaluates, then evaluates it
        layer = model.get_submodule("body.3.0")  # the conv of block body.3
        if getattr(layer, "act_threshold", None) is not None:
            with torch.no_grad():
                x = model.body[:3](model.stem(batches[0][0]))  # body.3's input: >= 0 after the ReLU
            beta = layer.act_threshold.detach().clone()
            seen.append((beta, float((x < beta.view(1, -1, 1, 1)).double().mean())))
        return original(model, loader, device)

    original = sens.accuracy
    monkeypatch.setattr(sens, "accuracy", accuracy)
    rows = scan(factory, ["body.3"], batches, activation="bnn", calibration_batches=batches[:1])
    assert [r["block"] for r in rows] == ["body.3"] and len(seen) == 1
    beta, below = seen[0]
    assert (beta > 0).all()  # the medians of post-ReLU channels, not the E2E beta = 0
    assert 0.3 < below < 0.7
    with pytest.raises(ValueError, match="calibration_batches"):
        scan(factory, ["body.3"], batches, activation="bnn")


def test_the_csv_writes_a_drop_as_its_decimal_and_reads_back_its_ranking(tmp_path):
    from pcpp.mixed import rank
    from stages.sensitivity import read_csv, write_csv

    rows = [{"block": "a", "params_binarized": 4, "drop_ptb": 0.82 - 0.67},  # 0.1499999999999999 as a float
            {"block": "b", "params_binarized": 2, "drop_ptb": 0.82 - 0.6705}]
    path = write_csv(rows, tmp_path / "s.csv")
    assert path.read_text().splitlines()[1:] == ["a,4,0.15", "b,2,0.1495"]
    assert rank(read_csv(path)) == ("drop_ptb", ["a", "b"])
