"""Threshold calibration and the activation-balance guard (pcpp.calibration), on closed forms, on every
timm family surgery accepts (tiny configs, random weights) and on the ResNet-20 teacher with CIFAR-10 images.

docs/contracts.md, "Binarized layers and surgery": a binarized activation whose inputs all fall on
one side of its threshold outputs a constant; the guard refuses it by name.
"""

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import pcpp.layers as pl
from pcpp import models, tasks
from pcpp.calibration import (
    balanced_median,
    calibrate_thresholds_,
    check_activation_balance,
    prepare_activations_,
    thresholds_set_next,
)
from pcpp.layers import BinaryConv2d, BinaryLinear
from pcpp.surgery import BinarizeSpec, binarize_

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DEMO_TEST = REPO / "pipelines" / "demo_data" / "cifar10-test-1000.tar.gz"
TEACHER = REPO / "pipelines" / "demo_data" / "resnet20-cifar10.th"


# ---- the balanced median ---------------------------------------------------------------------------------


def share_below(v: torch.Tensor, t: float) -> float:
    return float((v < t).double().mean())


def best_split(v: torch.Tensor) -> float:
    """Brute force: the most even split any threshold can give (candidates: every value and midpoint)."""
    u = v.unique()
    cands = torch.cat([u, (u[1:] + u[:-1]) / 2, u[-1:] + 1])
    return min(abs(share_below(v, float(t)) - 0.5) for t in cands)


def test_balanced_median_without_ties_is_the_median():
    rows = torch.tensor([[3.0, 1.0, 2.0, 5.0, 4.0], [0.5, -1.0, 2.0, 7.0, -3.0]], dtype=torch.float64)
    assert balanced_median(rows).tolist() == [3.0, 0.5]
    even = torch.tensor([[4.0, 1.0, 3.0, 2.0]])
    assert balanced_median(even).tolist() == [3.0]  # rank n // 2: two values below, two at or above


def test_balanced_median_after_a_relu_moves_above_the_zeros():
    # 7 zeros of 10: t = 0 puts every value on the + side; t between 0 and the smallest positive splits 7 / 3.
    row = torch.tensor([[0.0] * 7 + [0.2, 0.4, 0.9]])
    t = balanced_median(row).item()
    assert t == pytest.approx(0.1) and share_below(row, t) == 0.7
    # 3 zeros of 10: the ordinary median
    row = torch.tensor([[0.0] * 3 + [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]])
    assert balanced_median(row).item() == pytest.approx(0.3)
    assert balanced_median(torch.full((1, 6), 2.0)).item() == 2.0  # one value: nothing to split


@pytest.mark.parametrize("seed", range(20))
def test_balanced_median_is_the_most_even_split(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=gen))
    rows = torch.randint(-3, 4, (5, n), generator=gen).double().relu()  # many ties, like ReLU outputs
    for row, t in zip(rows, balanced_median(rows), strict=True):
        assert abs(share_below(row, float(t)) - 0.5) == pytest.approx(best_split(row))


# ---- calibration and the guard on a one-layer model ----------------------------------------------------------


def relu_then(layer: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), layer)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_calibration_sets_the_per_channel_median(kind):
    gen = torch.Generator().manual_seed(0)
    if kind == "conv":
        model = relu_then(BinaryConv2d(3, 4, 3, act_quantizer="bnn++"))
        batches = [torch.randn(4, 3, 6, 6, generator=gen) + torch.tensor([0.0, 1.0, -1.0]).view(1, 3, 1, 1)
                   for _ in range(2)]
        rows = torch.cat([b.relu().transpose(0, 1).reshape(3, -1) for b in batches], dim=1)
    else:
        model = relu_then(BinaryLinear(3, 4, act_quantizer="bnn"))
        batches = [torch.randn(4, 5, 3, generator=gen) + torch.tensor([0.0, 1.0, -1.0]) for _ in range(2)]
        rows = torch.cat([b.relu().reshape(-1, 3).T for b in batches], dim=1)
    model.train()
    out = calibrate_thresholds_(model, [(b, torch.zeros(len(b))) for b in batches])  # (x, y) pairs accepted
    layer = model[1]
    assert torch.equal(layer.act_threshold.detach(), balanced_median(rows))
    assert torch.equal(out["1"], layer.act_threshold.detach())
    assert model.training and not layer.honest  # flags restored
    report = check_activation_balance(model, torch.cat(batches))
    assert [r.name for r in report.rows] == ["1"]
    assert 0.3 < report.rows[0].below < 0.7


def test_calibration_of_a_model_without_thresholds_is_a_no_op():
    model = relu_then(BinaryConv2d(3, 4, 3))  # BW
    assert calibrate_thresholds_(model, [torch.randn(1, 3, 5, 5)]) == {}
    with pytest.raises(ValueError, match="no batch"):
        calibrate_thresholds_(relu_then(BinaryConv2d(3, 4, 3, act_quantizer="bnn")), [])
    with pytest.raises(ValueError, match="tensor"):
        calibrate_thresholds_(relu_then(BinaryConv2d(3, 4, 3, act_quantizer="bnn")), [[[1.0]]])


def test_guard_refuses_a_post_relu_layer_without_threshold_by_name():
    model = relu_then(BinaryConv2d(3, 4, 3, act_quantizer="bnn++", activation_placement="none"))
    x = torch.randn(4, 3, 6, 6)
    with pytest.raises(ValueError) as err:
        check_activation_balance(model, x)
    msg = str(err.value)
    for words in ("1 (0.0% below)", "activation_placement", "'threshold'", "activation_guard=warn"):
        assert words in msg
    report = check_activation_balance(model, x, strict=False)
    assert report.rows[0].below == 0.0 and report.rows[0].one_sided_channels == 1.0
    table = str(report).splitlines()
    assert [r.name for r in report.refused] == ["1"]
    assert table[-1].startswith("1 ") and table[-1].endswith("<- one-sided")
    assert table[0].startswith("# below:")  # the legend of the columns
    with pytest.raises(ValueError, match="limit"):
        check_activation_balance(model, x, limit=0.4)


def test_guard_on_uncalibrated_thresholds_says_to_calibrate_not_to_set_the_placement_already_set():
    model = relu_then(BinaryConv2d(3, 4, 3, act_quantizer="bnn++", activation_placement="threshold"))
    x = torch.randn(4, 3, 6, 6)
    with pytest.raises(ValueError) as err:  # beta = 0 after a ReLU: sign(x - 0) = +1 everywhere
        check_activation_balance(model, x)
    msg = str(err.value)
    assert "calibrate them" in msg and "calibration=batches" in msg and "'auto' or 'threshold'" not in msg
    calibrate_thresholds_(model, [x])
    assert check_activation_balance(model, x).refused == []


def test_guard_on_a_bw_model_has_nothing_to_check():
    assert check_activation_balance(relu_then(BinaryConv2d(3, 4, 3)), torch.randn(1, 3, 5, 5)).rows == []


# ---- every timm family surgery accepts (tiny configs, random weights) --------------------------------------

FAMILIES = {
    "resnet": ("resnet18", dict(layers=(1, 1, 1, 1))),
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2,
                                         act_layer="relu")),
    "deit": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=4, depths=(1, 1), num_heads=(1, 2),
                                                 embed_dim=24)),
    "convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(16, 24, 32, 48), act_layer="relu")),
    "efficientnet": ("efficientnet_b0", dict(act_layer="relu")),
}


def input_minima(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """The smallest input value each binarized layer sees under binary_eval (hooks written here)."""
    seen, handles = {}, []

    def record(name):
        def hook(module, args):
            seen.setdefault(name, float(args[0].min()))  # returns None: the input is left as it is
        return hook

    for name, m in pl.binary_layers(model):
        handles.append(m.register_forward_pre_hook(record(name)))
    with pl.binary_eval(model), torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("family", list(FAMILIES))
def test_guard_and_calibration_over_timm_families(family):
    name, kw = FAMILIES[family]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    calib, check = torch.randn(8, 3, 32, 32, generator=gen), torch.randn(8, 3, 32, 32, generator=gen)

    raw = models.create(name, num_classes=10, **kw)
    binarize_(raw, {"activation": "bnn++", "activation_placement": "none"})
    post_relu = {n for n, v in input_minima(raw, check).items() if v >= 0}  # every input >= 0: sign() is +1
    report = check_activation_balance(raw, check, strict=False)
    assert len(report.rows) == sum(1 for _ in pl.binary_layers(raw))
    assert {r.name for r in report.refused} == post_relu
    if family in ("resnet", "vit", "convnext", "efficientnet"):  # the ReLU families
        assert post_relu
        with pytest.raises(ValueError) as err:
            check_activation_balance(raw, check)
        named = [r.name for r in report.refused][:6]  # the message names the first six, then counts the rest
        assert all(n in str(err.value) for n in named)
        assert len(post_relu) <= 6 or f"and {len(post_relu) - 6} more" in str(err.value)

    model = models.create(name, num_classes=10, **kw)
    with thresholds_set_next():  # calibrated on the next line
        binarize_(model, {"activation": "bnn++", "activation_placement": "threshold"})
    report = prepare_activations_(model, [calib])  # calibrates, then checks: raises if a layer is refused
    assert not report.refused
    assert not check_activation_balance(model, check, strict=False).refused  # and on other inputs


# ---- the acceptance test on the ResNet-20 teacher (issue 8) ---------------------------------------------------

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cifar_sample() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1000 CIFAR-10 test JPEGs of the demo data, normalised as the teacher expects, mixed classes."""
    if not DEMO_TEST.is_file():
        pytest.skip(f"the demo CIFAR-10 sample is absent ({DEMO_TEST.relative_to(REPO)})")
    xs, ys = [], []
    with tarfile.open(DEMO_TEST) as tf:
        for m in tf:
            if m.isfile() and m.name.endswith(".jpg"):
                img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                xs.append(np.asarray(img, dtype=np.float32) / 255.0)
                ys.append(CLASSES.index(m.name.split("/")[-2]))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2)
    norm = models.normalization("resnet20")
    x = (x - torch.tensor(norm.mean).view(1, 3, 1, 1)) / torch.tensor(norm.std).view(1, 3, 1, 1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order], torch.tensor(ys)[order]


@pytest.fixture(scope="module")
def sample():
    return cifar_sample()


def teacher() -> nn.Module:
    if not TEACHER.is_file():
        pytest.skip(f"the ResNet-20 teacher is absent ({TEACHER.relative_to(REPO)})")
    return models.create("resnet20", pretrained_file=TEACHER)


@pytest.mark.parametrize("task, chosen", [(tasks.BWA, None), (tasks.BWAA, None), (tasks.BWA, "threshold"),
                                          (tasks.BWAA, "threshold"), (tasks.BWA, "pre_relu")])
def test_resnet20_placements_carry_information(sample, task, chosen):
    x, _ = sample
    model = teacher()
    spec = BinarizeSpec(**tasks.spec(task, "bnn++"))
    if chosen is not None:
        spec.activation_placement = chosen
    report = binarize_(model, spec)
    if chosen is None:  # the default
        assert spec.activation_placement == "auto" and report.activation_placement == "hardtanh"
    prepare_activations_(model, [x[k:k + 100] for k in range(0, 400, 100)])  # calibration images
    test = x[500:756]  # other images
    report = check_activation_balance(model, test)
    assert len(report.rows) == 18
    for r in report.rows:
        assert 0.05 <= r.below <= 0.95, (r.name, r.below)

    outputs, handles = {}, []

    def record(name):
        def hook(module, args, out):
            outputs.setdefault(name, out.detach())
        return hook

    for name, m in pl.binary_layers(model):
        handles.append(m.register_forward_hook(record(name)))
    with pl.binary_eval(model), torch.no_grad():
        model(test[:2])  # two different images
    for h in handles:
        h.remove()
    assert len(outputs) == 18
    for name, out in outputs.items():
        assert not torch.equal(out[0], out[1]), name


def test_resnet20_teacher_without_thresholds_is_refused_naming_every_layer(sample):
    x, _ = sample
    model = teacher()
    binarize_(model, {"activation": "bnn++", "activation_placement": "none"})
    with pytest.raises(ValueError) as err:
        check_activation_balance(model, x[:64])
    names = [n for n, _ in pl.binary_layers(model)]
    assert len(names) == 18 and all(f"{n} (0.0% below)" in str(err.value) for n in names[:6])
    assert names[6] not in str(err.value) and "and 12 more (the guard's table lists all)" in str(err.value)
    report = check_activation_balance(model, x[:64], strict=False)
    assert [r.name for r in report.refused] == names  # the table has them all


def test_uncalibrated_thresholds_warn_unless_trained_ones_are_loaded(sample, tmp_path):
    from pcpp import export, models
    from pcpp.calibration import UncalibratedThresholdsWarning

    spec = {"activation": "bnn", "activation_placement": "threshold"}
    model = teacher()
    with pytest.warns(UncalibratedThresholdsWarning, match="18 binarized activations binarize x - beta"):
        binarize_(model, spec)  # beta = 0 after every ReLU, and no guard ran
    torch.save(model.state_dict(), tmp_path / "student.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncalibratedThresholdsWarning)  # loaded thresholds: nothing to say
        models.load("resnet20", spec, weights=tmp_path / "student.pt")
        binarize_(teacher(), {"activation": "bnn", "activation_placement": "hardtanh"})  # no thresholds
        calibrated = teacher()
        binarize_(calibrated, spec, calibration=[sample[0][:64]])  # calibrated and guarded
        export.save(calibrated, tmp_path / "r20.safetensors")
        export.load(tmp_path / "r20.safetensors")  # the file carries the thresholds


def test_binarize_with_calibration_batches_calibrates_and_guards(sample):
    x, _ = sample
    model = teacher()
    report = binarize_(model, {"activation": "bnn", "activation_placement": "threshold"},
                       calibration=[(x[:128], None)])
    assert len(report.balance.rows) == 18 and not report.balance.refused
    assert all(m.act_threshold.abs().sum() > 0 for _, m in pl.binary_layers(model))
    refused = teacher()
    with pytest.raises(ValueError, match="layer1.2.conv2 .* and 12 more"):
        binarize_(refused, {"activation": "bnn", "activation_placement": "none"}, calibration=[x[:64]])
    assert binarize_(teacher(), {}, calibration=[x[:64]]).balance is None  # BW: nothing to check
    with pytest.warns(RuntimeWarning, match="18 of 18 binarized activations"):  # warn: goes on, and says so
        warned = binarize_(teacher(), {"activation": "bnn", "activation_placement": "none",
                                       "activation_guard": "warn"}, calibration=[x[:64]])
    assert len(warned.balance.refused) == 18
