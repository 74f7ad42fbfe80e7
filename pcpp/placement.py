"""Activation placement: where a binarized activation gets a signed input (docs/contracts.md, "Binarized
layers and surgery"; the paper's BWA / BWAA, section 4).

In a ReLU network every input of a binarized conv is >= 0, so sign() is +1 everywhere and the layer
carries nothing. The placements:

- "threshold" (ReActNet's RSign): each binarized layer owns a learnable per-input-channel beta and
  binarizes x - beta; `pcpp.calibration.calibrate_thresholds_` puts beta at the channel median when
  fine-tuning. Defined for every model (`pcpp.layers`).
- "hardtanh" (IR-Net / Bi-Real Net CNN layouts): each ReLU module that feeds a binarized conv becomes
  nn.Hardtanh(-1, 1), so the conv sees a signed input; the full-precision paths the ReLU fed (shortcuts)
  see the hardtanh too.
- "pre_relu" (the sign before the ReLU): a binarized conv reads the pre-activation its ReLU receives,
  while the full-precision paths (shortcuts, the head) keep the ReLU output, as in the teacher.
- "none": sign(x) of the raw input, for inputs that are signed already (e.g. after a LayerNorm).
- "auto" (the default of BinarizeSpec): "hardtanh" where the model defines the layouts, "threshold"
  everywhere else; the placement it resolves to is what layers, reports and manifests record.

Why "hardtanh" where it exists (bench/activation_placement.py, ResNet-20 BWA fine-tuned from the teacher
on 10k CIFAR-10 images, honest accuracy on 2k test images): with bnn++ weights and activations, 3 epochs,
seeds 0 / 1: hardtanh 18.7% / 20.6%, pre_relu 15.7% / 16.1%, threshold 10.3% / 10.1% (chance: bnn++'s SS'
is negative for |x - beta| > 2.4 / mu, and a median threshold puts the densest inputs in SS's soft zone,
so the honest sign differs most from the training forward). With bnn weights and activations the
threshold led (39.8% against 37.2% and 35.4%, 3 epochs, seed 0). The default pair is bnn++.

"hardtanh" and "pre_relu" change the model's block layout, so they exist only for models that describe
it: a model that defines `set_signed_inputs(placement, convs)` (pcpp.models.CifarResNet). Any other
model refuses them by name: pcpp never guesses a data flow. Parameter names never change, so teacher
checkpoints load before and binarized checkpoints after surgery.
"""

from __future__ import annotations

from torch import nn

from pcpp.layers import PLACEMENTS

LAYOUTS = ("hardtanh", "pre_relu")
AUTO = "auto"
SPEC_PLACEMENTS = (AUTO,) + PLACEMENTS  # what a BinarizeSpec accepts; layers take the resolved ones
DEFAULT_LAYOUT = "hardtanh"  # what "auto" picks for a model that defines the layouts (measured above)


def supports_layout(model: nn.Module) -> bool:
    """True when `model` describes its ReLU -> conv data flow (`set_signed_inputs`)."""
    return callable(getattr(model, "set_signed_inputs", None))


def resolve(model: nn.Module, placement: str) -> str:
    """The placement `model` gets: "auto" becomes DEFAULT_LAYOUT where the model defines the layouts and
    "threshold" elsewhere (an explicit fallback, recorded); any other name is checked and returned."""
    if placement == AUTO:
        return DEFAULT_LAYOUT if supports_layout(model) else "threshold"
    check(model, placement)
    return placement


def check(model: nn.Module, placement: str) -> None:
    """Raise ValueError unless `placement` is known and defined for `model`."""
    if placement not in SPEC_PLACEMENTS:
        raise ValueError(f"unknown activation_placement {placement!r}; valid: {', '.join(SPEC_PLACEMENTS)}")
    if placement in LAYOUTS and not supports_layout(model):
        raise ValueError(
            f"activation_placement {placement!r} rewires a CNN's ReLU -> binarized conv layout, which "
            f"{type(model).__name__} does not describe (only models defining set_signed_inputs do, e.g. "
            "resnet20); use activation_placement='threshold' (a calibrated per-channel threshold, defined for "
            "every model) or 'none' for inputs that are signed already")


def apply_(model: nn.Module, placement: str, convs: list[str]) -> dict:
    """Rewire `model` so that the binarized layers `convs` see signed inputs under `placement`.

    Only the layouts ("hardtanh", "pre_relu") change the model; the result, also stored as
    `model.pcpp_activation_layout` (export manifests, `export.load`), is
    {"placement": ..., "convs": [...], "changed": [module names rewired]}.
    Raises ValueError when the model does not describe the layout (see `check`).
    """
    placement = resolve(model, placement)
    layout = dict(getattr(model, "pcpp_activation_layout", None) or {})
    if placement not in LAYOUTS or not convs:
        return layout
    if layout and layout["placement"] != placement:
        raise ValueError(f"{type(model).__name__} already uses activation_placement {layout['placement']!r}; "
                         f"cannot add {placement!r} on top of it")
    all_convs = sorted(set(layout.get("convs", [])) | set(convs))
    changed = model.set_signed_inputs(placement, all_convs)
    model.pcpp_activation_layout = {"placement": placement, "convs": all_convs, "changed": changed}
    return model.pcpp_activation_layout
