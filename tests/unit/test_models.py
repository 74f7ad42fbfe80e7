"""Model factory: CIFAR ResNet-20 against the repository's teacher checkpoint, timm models, checkpoint errors."""

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from pcpp import models

pytestmark = pytest.mark.unit

# the ResNet-20 teacher shipped with the repository (pipelines/demo_data/README.md)
TEACHER = Path(__file__).resolve().parents[2] / "pipelines" / "demo_data" / "resnet20-cifar10.th"
RESNET20_PARAMS = 269_722


@pytest.fixture(scope="module")
def teacher_file() -> Path:
    # The teacher is part of the project's inputs: a missing file is a broken setup, not a reason to skip.
    assert TEACHER.is_file(), f"teacher checkpoint missing: {TEACHER}"
    return TEACHER


@pytest.fixture(scope="module")
def teacher_state(teacher_file) -> dict[str, torch.Tensor]:
    ckpt = torch.load(teacher_file, map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}


def test_resnet20_param_count_matches_checkpoint(teacher_state):
    model = models.create("resnet20")
    n_model = sum(p.numel() for p in model.parameters())
    n_ckpt = sum(
        v.numel() for k, v in teacher_state.items() if not k.endswith(("running_mean", "running_var"))
    )
    assert n_model == n_ckpt == RESNET20_PARAMS


def test_resnet20_forward_shape():
    model = models.create("resnet20", num_classes=7).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert models.create("resnet20")(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_resnet20_structure_is_swappable():
    # Surgery swaps convs/linears by name; the stem and head keep their names, blocks use plain modules.
    model = models.create("resnet20")
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.linear, nn.Linear)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19
    leaf_types = {type(m) for m in model.modules() if not list(m.children())}
    assert leaf_types <= {
        nn.Conv2d,
        nn.Linear,
        nn.BatchNorm2d,
        nn.ReLU,
        nn.Identity,
        nn.AdaptiveAvgPool2d,
        models.ZeroPadShortcut,
    }
    pickle.loads(pickle.dumps(model))


def test_zero_pad_shortcut():
    x = torch.randn(2, 16, 8, 8)
    y = models.ZeroPadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


def test_resnet20_keys_match_teacher(teacher_state):
    model_keys = {k for k in models.create("resnet20").state_dict() if not k.endswith("num_batches_tracked")}
    assert model_keys == set(teacher_state)


def test_load_teacher_strict(teacher_file, teacher_state):
    model = models.create("resnet20", pretrained_file=teacher_file)
    loaded = model.state_dict()
    for k, v in teacher_state.items():
        assert torch.equal(loaded[k], v), k


def test_load_raw_state_dict_with_prefix(tmp_path, teacher_state):
    path = tmp_path / "raw.pt"
    torch.save({f"module.{k}": v for k, v in teacher_state.items()}, path)
    model = models.load_checkpoint(models.create("resnet20"), path)
    assert torch.equal(model.linear.weight, teacher_state["linear.weight"])


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.th"
    with pytest.raises(FileNotFoundError, match="nope.th"):
        models.create("resnet20", pretrained_file=path)


def test_load_wrong_keys(tmp_path, teacher_state):
    sd = dict(teacher_state)
    sd["extra.weight"] = sd.pop("linear.weight")
    path = tmp_path / "renamed.th"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ValueError, match="renamed.th") as info:
        models.load_checkpoint(models.create("resnet20"), path)
    assert "missing keys: linear.weight" in str(info.value)
    assert "unexpected keys: extra.weight" in str(info.value)


def test_load_shape_mismatch_leaves_model_untouched(tmp_path, teacher_file):
    model = models.create("resnet20", num_classes=100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"linear\.weight: checkpoint \(10, 64\) vs model \(100, 64\)"):
        models.load_checkpoint(model, teacher_file)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_non_strict_ignores_extra_keys(tmp_path, teacher_state):
    path = tmp_path / "extra.th"
    torch.save({**teacher_state, "aux.weight": torch.zeros(3)}, path)
    models.load_checkpoint(models.create("resnet20"), path, strict=False)


@pytest.mark.parametrize("payload", [b"", b"not a checkpoint at all", None])
def test_load_corrupt_file(tmp_path, teacher_file, payload):
    path = tmp_path / "broken.th"
    # None: the real teacher cut in half, i.e. an interrupted copy
    path.write_bytes(
        teacher_file.read_bytes()[: teacher_file.stat().st_size // 2] if payload is None else payload
    )
    with pytest.raises(ValueError, match="broken.th"):
        models.create("resnet20", pretrained_file=path)


def test_load_file_without_state_dict(tmp_path):
    path = tmp_path / "meta.th"
    torch.save({"best_prec1": 91.0}, path)
    with pytest.raises(ValueError, match="meta.th.*no state dict"):
        models.create("resnet20", pretrained_file=path)


def test_timm_vit_on_cifar():
    model = models.create("deit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.patch_embed.num_patches == 64


def test_timm_pretrained_file_roundtrip(tmp_path):
    kw = dict(num_classes=10, img_size=32, patch_size=4)
    src = models.create("deit_tiny_patch16_224", **kw)
    path = tmp_path / "deit.safetensors"
    from safetensors.torch import save_file

    save_file(src.state_dict(), str(path))
    dst = models.create("deit_tiny_patch16_224", pretrained_file=path, **kw)
    assert torch.equal(dst.head.weight, src.head.weight)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="resnet21") as info:
        models.create("resnet21")
    assert "resnet20" in str(info.value)


def test_resnet20_rejects_extra_kwargs():
    with pytest.raises(ValueError, match="img_size"):
        models.create("resnet20", img_size=32)


def test_normalization():
    assert models.normalization("resnet20") == models.CIFAR_TEACHER_NORMALIZATION
    assert models.MODEL_NORMALIZATION["resnet20"].mean == (0.485, 0.456, 0.406)
    assert models.MODEL_NORMALIZATION["resnet20"].std == (0.229, 0.224, 0.225)
    assert len(models.normalization("deit_tiny_patch16_224").mean) == 3


# --- the one loader: architecture, binarization, weights ---


def test_load_builds_binarizes_and_loads_in_that_order(tmp_path, teacher_file):
    from pcpp.layers import BinaryConv2d

    recipe = {"name": "resnet20", "kwargs": {"num_classes": 10}}
    ft = models.load(recipe, {"weight": "bnn"}, pretrained=teacher_file)  # teacher weights, then binarized
    teacher = models.load("resnet20", weights=teacher_file)
    assert isinstance(ft.layer1[0].conv1, BinaryConv2d) and type(teacher.layer1[0].conv1) is nn.Conv2d
    assert torch.equal(ft.layer1[0].conv1.weight, teacher.layer1[0].conv1.weight)
    assert ft.pcpp_recipe == recipe
    with torch.no_grad():
        ft.layer1[0].conv1.weight.mul_(-1.0)
    path = tmp_path / "student.pt"
    torch.save(ft.state_dict(), path)
    steps = [{"weight": "bnn", "include": ["layer1"]}, {"weight": "bnn"}]
    for weights in (path, ft.state_dict()):
        student = models.load(recipe, steps, weights=weights)  # a binarized state dict needs the binarized model
        assert torch.equal(student.layer1[0].conv1.weight, ft.layer1[0].conv1.weight)
        assert [s["include"] for s in student.pcpp_binarize] == [["layer1"], ["*"]]


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="valid: name, kwargs"):
        models.load({"name": "resnet20", "num_classes": 10})
    with pytest.raises(ValueError, match="a model recipe is a name"):
        models.load({"kwargs": {}})
    with pytest.raises(ValueError, match="matches no module"):
        models.load("resnet20", {"include": ["layer9"]})
    with pytest.raises(FileNotFoundError):
        models.load("resnet20", weights=tmp_path / "absent.pt")
    # A BWA model's thresholds are not in a full-precision state dict.
    with pytest.raises(ValueError, match="state dict does not match CifarResNet: missing keys: .*act_threshold"):
        models.load("resnet20", {"activation": "bnn", "activation_placement": "threshold"},
                    weights=models.create("resnet20").state_dict())
