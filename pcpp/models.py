"""Model factory: CIFAR ResNet-20 (He et al. 2016) and any timm model by name, built offline."""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CIFAR_TEACHER_NORMALIZATION",
    "MODEL_NORMALIZATION",
    "BasicBlock",
    "CifarResNet",
    "Normalization",
    "ZeroPadShortcut",
    "create",
    "load",
    "load_checkpoint",
    "load_state",
    "normalization",
    "resnet20",
]


class Normalization(NamedTuple):
    """Per-channel input normalisation (mean, std) applied to images scaled to [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# The ResNet-20 teacher (../shared/teachers/resnet20-cifar10.th) was trained with ImageNet statistics.
CIFAR_TEACHER_NORMALIZATION = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
MODEL_NORMALIZATION: dict[str, Normalization] = {"resnet20": CIFAR_TEACHER_NORMALIZATION}


# --- CIFAR ResNet (He et al. 2016, section 4.2; layout of Idelbayev's pytorch_resnet_cifar10) ---


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut (He et al. 2016): subsample by `stride`, zero-pad the extra channels."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        if planes < in_planes:
            raise ValueError(f"option-A shortcut cannot shrink channels ({in_planes} -> {planes})")
        self.stride = stride
        self.pad_front = (planes - in_planes) // 2
        self.pad_back = planes - in_planes - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_front}, {self.pad_back})"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (He et al. 2016)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ZeroPadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()
        # pcpp.placement "pre_relu": conv1 / conv2 read the pre-activation their ReLU receives.
        self.signed_conv1 = False
        self.signed_conv2 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))

    def forward_preact(self, p: torch.Tensor, relu_in: nn.Module) -> torch.Tensor:
        """The block on the pre-activation p of its input (x = relu_in(p)); returns its own, before relu2.

        Equal to `forward` on relu_in(p) when no conv is signed: only signed convs see p (or bn1's output).
        """
        x = relu_in(p)
        h = self.bn1(self.conv1(p if self.signed_conv1 else x))
        out = self.bn2(self.conv2(h if self.signed_conv2 else self.relu1(h)))
        return out + self.shortcut(x)


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2): a 16-channel stem, three stages of n blocks (16/32/64), GAP, `linear` head."""

    def __init__(self, num_blocks: tuple[int, int, int] = (3, 3, 3), num_classes: int = 10):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(16, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(32, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(64, num_blocks[2], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        self.num_classes = num_classes
        self.apply(_kaiming_init)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (num_blocks - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def blocks(self) -> list[tuple[str, BasicBlock]]:
        return [(f"layer{i}.{j}", b) for i, layer in enumerate((self.layer1, self.layer2, self.layer3), 1)
                for j, b in enumerate(layer)]

    def activation_feeds(self) -> dict[str, list[str]]:
        """Which ReLU module feeds which convs: the stem's and each relu2 feed the next block's conv1,
        relu1 its block's conv2 (the last relu2 feeds the pooled head only, so it is absent)."""
        feeds, prev = {}, "relu"
        for name, _ in self.blocks():
            feeds.setdefault(prev, []).append(f"{name}.conv1")
            feeds[f"{name}.relu1"] = [f"{name}.conv2"]
            prev = f"{name}.relu2"
        return feeds

    def set_signed_inputs(self, placement: str, convs: list[str]) -> list[str]:
        """Give the convs named in `convs` a signed input (pcpp.placement); returns the modules changed.

        "hardtanh": each ReLU module feeding one of them becomes nn.Hardtanh(-1, 1) (IR-Net / Bi-Real).
        "pre_relu": they read their ReLU's input (the sign before the ReLU); every other path keeps the
        ReLU output. No parameter is added or renamed. Raises ValueError for another placement.
        """
        wanted = set(convs)
        changed = []
        if placement == "hardtanh":
            for relu, fed in self.activation_feeds().items():
                if wanted & set(fed) and not isinstance(self.get_submodule(relu), nn.Hardtanh):
                    parent, _, child = relu.rpartition(".")
                    setattr(self.get_submodule(parent) if parent else self, child, nn.Hardtanh(-1.0, 1.0))
                    changed.append(relu)
            return changed
        if placement != "pre_relu":
            raise ValueError(f"unknown signed-input layout {placement!r}; valid: hardtanh, pre_relu")
        for name, block in self.blocks():
            for attr, conv in (("signed_conv1", "conv1"), ("signed_conv2", "conv2")):
                if f"{name}.{conv}" in wanted:
                    setattr(block, attr, True)
                    changed.append(f"{name}.{conv}")
        return changed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not any(b.signed_conv1 or b.signed_conv2 for _, b in self.blocks()):
            x = self.relu(self.bn1(self.conv1(x)))
            return self.layer3(self.layer2(self.layer1(x)))
        # "pre_relu": carry pre-activations between blocks so that a signed conv can read them.
        p, relu_in = self.bn1(self.conv1(x)), self.relu
        for _, block in self.blocks():
            p, relu_in = block.forward_preact(p, relu_in), block.relu2
        return relu_in(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.pool(self.forward_features(x)), 1))


def _kaiming_init(m: nn.Module) -> None:
    # Idelbayev's _weights_init: kaiming_normal_ (fan_in) on conv and linear weights, biases left default.
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(m.weight)


def resnet20(num_classes: int | None = None) -> CifarResNet:
    """CIFAR ResNet-20 (He et al. 2016): 0.27M parameters, option-A shortcuts."""
    return CifarResNet((3, 3, 3), num_classes=10 if num_classes is None else num_classes)


_LOCAL_MODELS: dict[str, Callable[..., nn.Module]] = {"resnet20": resnet20}


# --- checkpoints ---


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch raises RuntimeError / UnpicklingError / EOFError for truncated or foreign files
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(
            f"checkpoint {path} holds no state dict (expected a mapping of str to tensors, "
            f"or a dict with one under 'state_dict'/'model')"
        )
    return dict(obj)


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    # DataParallel / DDP checkpoints prefix every key; strip only when all keys carry it.
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def _first(items: list[str], n: int = 5) -> str:
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load weights from `path` into `model` and return it.

    Accepts `torch.save` files holding a state dict or a dict with one under "state_dict" (the format of
    Idelbayev's checkpoints) or "model", and `.safetensors` files; a `module.` prefix is stripped.
    Nothing is copied unless all shapes match and, with `strict`, the key sets match too.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return load_state(model, _read_state_dict(path), strict=strict, source=f"checkpoint {path}")


def load_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True,
               source: str = "state dict") -> nn.Module:
    """`load_checkpoint` for a state dict in memory: the same checks, ValueError naming `source`."""
    state_dict = _strip_prefix(dict(state_dict))
    expected = model.state_dict()
    # Checkpoints from torch < 0.4.1 lack BatchNorm's num_batches_tracked; BatchNorm fills it in on load.
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatches: {_first(mismatched)}")
    if strict and missing:
        problems.append(f"missing keys: {_first(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if problems:
        raise ValueError(f"{source} does not match {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=strict)
    return model


# --- factory ---


def create(
    name: str, *, num_classes: int | None = None, pretrained_file: str | os.PathLike | None = None, **kw: Any
) -> nn.Module:
    """Build model `name` offline: a local model (`resnet20`) or any timm model.

    Extra keyword arguments go to the timm constructor, e.g. `img_size=32, patch_size=4` for a ViT on
    CIFAR. `pretrained_file` loads weights from a local checkpoint (see `load_checkpoint`); nothing is
    ever downloaded.
    """
    if name in _LOCAL_MODELS:
        if kw:
            raise ValueError(f"model {name!r} takes no extra arguments, got {sorted(kw)}")
        model = _LOCAL_MODELS[name](num_classes=num_classes)
    else:
        import timm

        if not timm.is_model(name):
            candidates = list(_LOCAL_MODELS) + timm.list_models()
            close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown model {name!r} (neither local nor in timm){hint}")
        if num_classes is not None:
            kw["num_classes"] = num_classes
        model = timm.create_model(name, pretrained=False, **kw)
    if pretrained_file is not None:
        load_checkpoint(model, pretrained_file)
    # How to rebuild the architecture (export manifests, pipeline artifacts); weights are stored apart.
    model.pcpp_recipe = {"name": name, "kwargs": {**kw, "num_classes": num_classes}}
    return model


def load(recipe: str | Mapping, binarize=None, weights: str | os.PathLike | Mapping | None = None, *,
         pretrained: str | os.PathLike | None = None, strict: bool = True) -> nn.Module:
    """The one model loader: architecture, binarization, weights, in that order.

    recipe: a model name or {"name": ..., "kwargs": {...}} (what `create` records as `model.pcpp_recipe`,
    the `recipe` of export manifests and pipeline artifacts); `num_classes` may sit in the kwargs.
    pretrained: full-precision weights loaded before binarization (a teacher's, to fine-tune from).
    binarize: None (full precision), a spec (pcpp.surgery.BinarizeSpec or its dict), or a list of specs
    applied in order (a model binarized in steps), each through `pcpp.surgery.binarize_`.
    weights: a checkpoint file (see `load_checkpoint`) or a state dict of the model as binarized.
    Raises ValueError for an unknown model, a spec that does not fit it, or weights that do not match
    (shapes, and with `strict` the key sets); FileNotFoundError for a missing checkpoint file.
    """
    if isinstance(recipe, str):
        recipe = {"name": recipe}
    if not isinstance(recipe, Mapping) or not isinstance(recipe.get("name"), str):
        raise ValueError(f"a model recipe is a name or {{'name': ..., 'kwargs': {{...}}}}, got {recipe!r}")
    unknown = sorted(set(recipe) - {"name", "kwargs"})
    if unknown:
        raise ValueError(f"unknown model recipe keys {unknown}; valid: name, kwargs")
    model = create(recipe["name"], **dict(recipe.get("kwargs") or {}))
    if pretrained is not None:
        load_checkpoint(model, pretrained)
    if binarize is not None:
        from pcpp.calibration import thresholds_set_next
        from pcpp.surgery import binarize_  # surgery is the layer above the model factory

        # with weights, the thresholds come from them: no warning about uncalibrated ones
        with thresholds_set_next() if weights is not None else contextlib.nullcontext():
            for spec in binarize if isinstance(binarize, (list, tuple)) else [binarize]:
                binarize_(model, spec)
    if isinstance(weights, Mapping):
        load_state(model, weights, strict=strict)
    elif weights is not None:
        load_checkpoint(model, weights, strict=strict)
    return model


def normalization(name: str) -> Normalization:
    """Input normalisation a model of this name expects: the teacher's for local models, else timm's."""
    if name in MODEL_NORMALIZATION:
        return MODEL_NORMALIZATION[name]
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    mean = getattr(cfg, "mean", None) or IMAGENET_DEFAULT_MEAN
    std = getattr(cfg, "std", None) or IMAGENET_DEFAULT_STD
    return Normalization(mean=tuple(mean), std=tuple(std))
