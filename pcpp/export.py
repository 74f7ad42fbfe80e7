"""Bit-packed export of a binarized model: one safetensors file plus a JSON manifest.

Binarized weights are stored as 1 bit each (sign(w*); 1 = +1) plus one scale per layer or channel; every
other tensor of the state dict is stored as it is (at the default precision, fp32; see below). Tensors are
laid flat, one buffer per dtype, so the file is the ideal size plus a few hundred bytes of header; the
manifest records the model recipe (name, constructor arguments), each binarized layer's settings (pairs,
scaling, activation placement, whether it has an activation threshold), the model's signed-input layout
(pcpp.placement) and the per-tensor layout. Activation thresholds are state-dict tensors, stored as such.

`save(model, path)` returns the size summary; `load(path)` returns the model in honest binarized-eval
mode, whose logits equal those of the exported model under `binary_eval` (BW, BWA, BWAA, with
thresholds and any activation placement).

`save(..., precision="fp16" | "bf16")` stores the kept full-precision tensors (first conv / patch embedding,
head, norms, biases, thresholds, positional embeddings, the binarized layers' scales: everything but the
packed bits) at 2 bytes a value instead of 4; the manifest records the precision and each tensor's own
dtype, and `load` casts them back to the dtype they were saved from (fp32 for a fp32 model). ViT-B/16
BW: 17.15 MB (16.35 MiB) with fp32, 13.88 MB (13.24 MiB) with fp16 or bf16 (the paper: 450 MB -> 15 MB;
measured by bench/export_size.py). The default, fp32, stays bit-exact. Otherwise:
- BW (no binarized activation): the logits differ from `binary_eval`'s by rounding only,
  `round_trip_error(got, expected) <= LOGIT_TOLERANCE[precision]` (the largest absolute difference over
  the largest absolute logit; fp16 5e-3, bf16 5e-2, measured figures beside LOGIT_TOLERANCE).
- BWA / BWAA: no logit bound holds (`round_trip_tolerance` returns None). Sign activations turn a rounding
  of 2.4e-4 into flipped signs that propagate: a trained ResNet-20 BWA changes 16% of its predictions when
  its *input* is scaled by 1 + 1e-4, and 37% with fp16 tensors; its accuracy stays within 0.2 points
  (2,000 CIFAR-10 test images: 49.40% binary_eval, 49.35% fp16, 49.20% bf16). Check accuracy, not logits.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pcpp.layers import BINARY_TYPES, BinaryMixin, binary_layers, set_binary_eval
from pcpp.surgery import add_attention_norm

FORMAT = "pcpp-export/1"

# how the kept (not bit-packed) floating tensors are stored
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Bound on round_trip_error (max |reloaded - binary_eval| / max |binary_eval| over a batch) of a BW model
# per precision, about 3x the worst measured: fp16 1.6e-3 (ResNet-20, teacher weights, random inputs;
# 1.5e-3 trained, 2,000 CIFAR-10 test images, predictions all equal), 3.4e-4 (DeiT-T); bf16 1.6e-2
# (ResNet-20; 1.4e-2 trained, 99.4% equal predictions, same accuracy), 2.7e-3 (DeiT-T). ViT-B/16 BW
# (bench/export_size.py): fp16 8.4e-4, bf16 4.5e-3. Binarized activations: no bound (round_trip_tolerance).
LOGIT_TOLERANCE = {"fp32": 0.0, "fp16": 5e-3, "bf16": 5e-2}


def check_precision(precision: str, what: str = "export precision") -> torch.dtype:
    """The torch dtype of an export precision; ValueError naming `what`, the bad value and the valid ones."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown {what} {precision!r}; valid: {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def kept_dtype(t: torch.Tensor, precision: str) -> torch.dtype:
    """The dtype a kept tensor is stored in: floating tensors wider than the precision are cast to it,
    everything else (integer buffers, tensors already at 2 bytes) is stored as it is."""
    target = check_precision(precision)
    if t.is_floating_point() and t.element_size() > target.itemsize:
        return target
    return t.dtype


def round_trip_tolerance(model: nn.Module, precision: str) -> float | None:
    """The bound on round_trip_error for `model` exported at `precision`: 0.0 at fp32 (bit-exact),
    LOGIT_TOLERANCE[precision] for a BW model, None (no bound, see the module docstring) when a binarized
    layer has binarized activations and the precision is reduced."""
    check_precision(precision)
    if precision == "fp32":
        return 0.0
    if any(layer.act_quantizer is not None for _, layer in binary_layers(model)):
        return None
    return LOGIT_TOLERANCE[precision]


def round_trip_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|: what LOGIT_TOLERANCE bounds (0.0 means bit-exact)."""
    diff = (got.double() - expected.double()).abs().max().item()
    return diff / max(expected.double().abs().max().item(), 1e-30)


# -- bit packing ---------------------------------------------------------------------------------------
def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Pack a {-1, +1} tensor into uint8, 8 signs a byte, most significant bit first (1 means +1)."""
    bits = (signs.reshape(-1) > 0).to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (bits.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, numel: int, dtype=torch.float32) -> torch.Tensor:
    """Inverse of pack_signs: the first `numel` signs as a {-1, +1} tensor of `dtype`."""
    if packed.dtype != torch.uint8 or packed.numel() * 8 < numel:
        raise ValueError(f"cannot unpack {numel} signs from {packed.numel()} bytes of {packed.dtype}")
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].to(dtype) * 2 - 1


# -- size summary ----------------------------------------------------------------------------------------
@dataclass
class LayerSize:
    name: str
    kind: str
    binary_params: int
    fp_params: int
    bytes: int  # at the export precision
    scales: int = 0  # scales that binarization adds (not part of the fp32 model)
    bytes_kept_fp32: int = 0  # the same layer with its kept tensors and scales in fp32


@dataclass
class SizeSummary:
    """Per-layer size table in the manner of larq's model summary."""

    rows: list[LayerSize]
    file_bytes: int | None = None
    precision: str = "fp32"

    @property
    def binary_params(self) -> int:
        return sum(r.binary_params for r in self.rows)

    @property
    def fp_params(self) -> int:
        return sum(r.fp_params for r in self.rows)

    @property
    def ideal_bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def ideal_bytes_kept_fp32(self) -> int:
        """The ideal size with the kept tensors and scales in fp32 (equal to ideal_bytes at fp32)."""
        return sum(r.bytes_kept_fp32 for r in self.rows)

    @property
    def fp32_bytes(self) -> int:
        """Size of the float model: every stored tensor at 4 bytes per value (no scales)."""
        return sum(4 * (r.binary_params + r.fp_params) for r in self.rows)

    @property
    def ratio(self) -> float:
        """fp32 size / packed size (the paper: ViT-B 450 MB -> 15 MB, about 30x)."""
        return self.fp32_bytes / (self.file_bytes or self.ideal_bytes)

    def to_dict(self) -> dict:
        return {"binary_params": self.binary_params, "fp_params": self.fp_params, "ideal_bytes": self.ideal_bytes,
                "file_bytes": self.file_bytes, "fp32_bytes": self.fp32_bytes, "ratio_to_fp32": self.ratio,
                "precision": self.precision, "ideal_bytes_kept_fp32": self.ideal_bytes_kept_fp32}

    def __str__(self) -> str:
        """The per-layer table; at fp16 / bf16 a column gives each layer's bytes with its kept tensors in fp32."""
        w = max([len(r.name) for r in self.rows] + [5])
        reduced = self.precision != "fp32"
        both = f"  {'kept fp32':>12}" if reduced else ""
        head = f"{'layer':<{w}}  {'type':<13}  {'binary':>11}  {'fp':>11}{both}  {'bytes':>12}  {'x fp32':>7}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            ratio = 4 * (r.binary_params + r.fp_params) / r.bytes if r.bytes else 0.0
            both = f"  {r.bytes_kept_fp32:>12,}" if reduced else ""
            lines.append(f"{r.name:<{w}}  {r.kind:<13}  {r.binary_params:>11,}  {r.fp_params:>11,}{both}  "
                         f"{r.bytes:>12,}  {ratio:>6.1f}x")
        lines.append("-" * len(head))
        both = f"  {self.ideal_bytes_kept_fp32:>12,}" if reduced else ""
        lines.append(f"{'total':<{w}}  {'':<13}  {self.binary_params:>11,}  {self.fp_params:>11,}{both}  "
                     f"{self.ideal_bytes:>12,}  {self.fp32_bytes / self.ideal_bytes:>6.1f}x")
        size = f"fp32 {self.fp32_bytes / 2**20:.2f} MiB -> packed {self.ideal_bytes / 2**20:.3f} MiB (ideal)"
        if reduced:
            size = (f"fp32 {self.fp32_bytes / 2**20:.2f} MiB -> packed {self.ideal_bytes_kept_fp32 / 2**20:.3f} MiB "
                    f"with the kept tensors in fp32, {self.ideal_bytes / 2**20:.3f} MiB in {self.precision} (ideal)")
        if self.file_bytes is not None:
            size += f", file {self.file_bytes / 2**20:.3f} MiB: {self.ratio:.1f}x smaller than fp32"
        lines.append(size)
        return "\n".join(lines)


def _owner(name: str) -> str:
    return name.rpartition(".")[0] or name


def size_summary(model: nn.Module, precision: str = "fp32") -> SizeSummary:
    """Sizes of what `save(..., precision=precision)` stores: 1 bit per binarized weight + the scales +
    every other tensor (floating ones at `precision`, see kept_dtype); works on a meta-device model."""
    scale_bytes = check_precision(precision).itemsize
    binary = dict(binary_layers(model))
    per_layer: dict[str, LayerSize] = {}
    modules = dict(model.named_modules())
    for key, t in model.state_dict().items():
        owner = _owner(key)
        row = per_layer.setdefault(owner, LayerSize(owner, type(modules.get(owner, model)).__name__, 0, 0, 0))
        layer = binary.get(owner)
        if layer is not None and key == f"{owner}.weight":
            row.binary_params += t.numel()
            n_scales = t.shape[0] if layer.scaling == "channel" else 1
            row.scales += n_scales
            row.bytes += math.ceil(t.numel() / 8) + scale_bytes * n_scales
            row.bytes_kept_fp32 += math.ceil(t.numel() / 8) + 4 * n_scales
        else:
            if t.is_floating_point():
                row.fp_params += t.numel()
            row.bytes += t.numel() * kept_dtype(t, precision).itemsize
            row.bytes_kept_fp32 += t.numel() * t.element_size()
    return SizeSummary(list(per_layer.values()), precision=precision)


# -- save / load -------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save(model: nn.Module, path: str | Path, *, recipe: dict | None = None,
         precision: str = "fp32") -> SizeSummary:
    """Export `model` to `path` (.safetensors) and `path.json`; returns the size summary (bytes).

    The manifest records the recipe (`recipe`, else `model.pcpp_recipe` from pcpp.models.create), the
    binarize_ specs the model went through, each binarized layer's settings, the tensor layout and the
    precision of the kept tensors: "fp32" (default, bit-exact round trip), "fp16" or "bf16" (2 bytes a
    value, logits within LOGIT_TOLERANCE[precision] of binary_eval's, see the module docstring).
    Raises ValueError for an unknown precision, without a recipe, without a binarized layer, for a layer
    whose weight pair has no binary honest value (fp), or for a tensor that overflows fp16 (naming it).
    """
    scale_dtype = check_precision(precision)
    path = Path(path)
    recipe = recipe or getattr(model, "pcpp_recipe", None)
    if recipe is None:
        raise ValueError("export needs the model recipe (name and constructor arguments): build the model "
                         "with pcpp.models.create or pass recipe={'name': ..., 'kwargs': {...}}")
    binary = dict(binary_layers(model))
    if not binary:
        raise ValueError(f"{type(model).__name__} has no binarized layer: run pcpp.surgery.binarize_ first")

    bits, scales, flat = [], [], {}
    layout, layers = [], {}
    bit_offset = scale_offset = 0
    offsets: dict[str, int] = {}
    for key, t in model.state_dict().items():
        owner = _owner(key)
        if owner in binary and key == f"{owner}.weight":
            try:
                signs, s = binary[owner].binary_weight()
            except ValueError as e:
                raise ValueError(f"cannot export layer {owner}: {e}") from None
            packed = pack_signs(signs.cpu())
            s = _cast(key + " (scales)", s.reshape(-1).float().cpu(), scale_dtype, precision)
            bits.append(packed)
            scales.append(s)
            layout.append({"key": key, "kind": "binary", "shape": list(t.shape), "dtype": str(t.dtype),
                           "byte_offset": bit_offset, "scale_offset": scale_offset, "scales": s.numel()})
            bit_offset += packed.numel()
            scale_offset += s.numel()
        else:
            stored = _cast(key, t.detach().reshape(-1).cpu(), kept_dtype(t, precision), precision)
            group = str(stored.dtype).replace("torch.", "")
            flat.setdefault(group, []).append(stored)
            offset = offsets.get(group, 0)
            layout.append({"key": key, "kind": "tensor", "group": group, "shape": list(t.shape),
                           "offset": offset, "numel": t.numel(), "dtype": str(t.dtype)})
            offsets[group] = offset + t.numel()
    for name, layer in binary.items():
        layers[name] = {"type": type(layer).__name__, **layer.binary_config()}

    tensors = {"binary.bits": torch.cat(bits), "binary.scales": torch.cat(scales)}
    tensors.update({f"flat.{g}": torch.cat(ts) for g, ts in flat.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    tmp.replace(path)

    summary = size_summary(model, precision)
    summary.file_bytes = path.stat().st_size
    manifest = {"format": FORMAT, "file": path.name, "sha256": sha256_file(path), "precision": precision,
                "recipe": recipe,
                "binarize": _specs(model), "layers": layers,
                "extra_norms": list(getattr(model, "pcpp_extra_norms", [])),
                "activation_layout": dict(getattr(model, "pcpp_activation_layout", None) or {}),
                "layout": layout, "summary": summary.to_dict()}
    manifest_path(path).write_text(json.dumps(manifest, indent=1))
    return summary


def _cast(key: str, t: torch.Tensor, dtype: torch.dtype, precision: str) -> torch.Tensor:
    """`t` in `dtype`, refused (naming the tensor) when a finite value does not fit (fp16 tops at 65504);
    a RuntimeWarning (naming it) when nonzero values round to 0 (fp16's smallest is 6e-8: a dead channel's
    scale, a tiny running variance), which the reloaded model then holds."""
    if t.dtype == dtype:
        return t
    out = t.to(dtype)
    wider = "bf16 or fp32" if precision == "fp16" else "fp32"
    if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(t).all()):
        raise ValueError(f"cannot export {key} in {precision}: its values reach {t.abs().max().item():.4g}, "
                         f"beyond {precision}'s range (largest {torch.finfo(dtype).max:.4g}); use {wider}")
    lost = (out == 0) & (t != 0)
    if bool(lost.any()):
        warnings.warn(f"exporting {key} in {precision}: {int(lost.sum())} nonzero value(s) become 0 (the smallest, "
                      f"{t[lost].abs().min().item():.3g}, is below {precision}'s smallest value "
                      f"{_smallest(dtype):.3g}); use {wider} to keep them", RuntimeWarning, stacklevel=3)
    return out


def _smallest(dtype: torch.dtype) -> float:
    """The smallest positive value of a floating dtype (its smallest subnormal)."""
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r} in the export manifest")
    return dtype


def _read_manifest(path: Path) -> dict:
    mpath = manifest_path(path)
    if not path.exists():
        raise FileNotFoundError(f"export file {path} does not exist")
    if not mpath.exists():
        raise FileNotFoundError(f"export manifest {mpath} is missing (it is written beside {path.name})")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"export manifest {mpath} is corrupt: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{mpath}: unknown export format {manifest.get('format')!r}, expected {FORMAT!r}")
    precision = manifest.setdefault("precision", "fp32")  # manifests from before the option are fp32
    if precision not in PRECISIONS:
        raise ValueError(f"{mpath}: unknown export precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return manifest


def _specs(model: nn.Module) -> list[dict] | None:
    """The binarize_ specs the model went through (pcpp.surgery records them), or None when a spec holds
    something JSON cannot store (a Quantizer object): the per-layer settings rebuild such a model."""
    specs = getattr(model, "pcpp_binarize", None)
    try:
        return json.loads(json.dumps(specs)) if specs else None
    except (TypeError, ValueError):
        return None


def _pair_spec(state: dict | None) -> dict | None:
    """A quantizer's recorded state ({"name", "params", "options"}) as a spec dict for binarize_."""
    return None if state is None else {"name": state["name"], **state.get("params", {}), **state.get("options", {})}


def _layer_specs(layers: dict) -> list[dict]:
    """binarize_ specs equal to a manifest's per-layer settings: one per group of identical settings, naming
    its layers exactly (manifests without `binarize`, written before it was recorded, rebuild this way).

    Manifests written before activation placements record neither placement key: their activations were
    sign(x) of the raw input ("none", no threshold) unless ReAct learned a beta, which becomes the threshold.
    """
    groups: dict[str, dict] = {}
    for name, cfg in layers.items():
        act = cfg["act_quantizer"]
        spec = {"weight": _pair_spec(cfg["weight_quantizer"]), "activation": _pair_spec(act),
                "scaling": cfg["scaling"], "units": cfg["units"], "accumulator_bits": cfg["accumulator_bits"],
                "activation_placement": cfg.get("activation_placement", "none") if act else "auto",
                "keep_first": False, "keep_head": False}
        groups.setdefault(json.dumps(spec, sort_keys=True), {**spec, "include": []})["include"].append(name)
    return list(groups.values())


SETTINGS = ("scaling", "units", "accumulator_bits", "activation_placement", "act_threshold")


def _differences(built: dict, recorded: dict) -> list[str]:
    """The settings in which a rebuilt layer differs from the manifest's record (keys it records only)."""
    out = [k for k in SETTINGS if k in recorded and built[k] != recorded[k]]
    for k in ("weight_quantizer", "act_quantizer"):
        name = (built[k] or {}).get("name")
        if name != (recorded[k] or {}).get("name"):
            out.append(k)
    return out


def _rebuild(manifest: dict, path: Path) -> nn.Module:
    """The exported architecture, binarized through binarize_ from the manifest's specs, before any weight."""
    from pcpp import models

    recipe, layers = manifest["recipe"], manifest["layers"]
    specs = manifest.get("binarize") or _layer_specs(layers)
    template = models.create(recipe["name"], **recipe.get("kwargs", {}))
    for name, cfg in layers.items():  # a wrong recipe is named here rather than as a pattern that matches nothing
        try:
            m = template.get_submodule(name)
        except AttributeError:
            m = None
        cls = BINARY_TYPES.get(type(m))
        if cls is None or cls.__name__ != cfg["type"]:
            raise ValueError(f"{path}: layer {name} is a {type(m).__name__} in {recipe['name']}, "
                             f"the manifest says {cfg['type']}")
    from pcpp.calibration import thresholds_set_next

    try:
        with thresholds_set_next():  # the manifest's weights carry the thresholds: loaded right after
            model = models.load(recipe, binarize=specs)
    except ValueError as e:
        raise ValueError(f"{path}: the manifest's binarization does not rebuild {recipe['name']}: {e}") from None
    built = {name: layer.binary_config() for name, layer in binary_layers(model)}
    if set(built) != set(layers):
        raise ValueError(f"{path}: binarizing {recipe['name']} as the manifest says gives the layers "
                         f"{sorted(set(built) ^ set(layers))[:5]} that the export does not have (or lacks)")
    for name, cfg in layers.items():
        differ = _differences(built[name], cfg)
        if differ:
            raise ValueError(f"{path}: layer {name} rebuilt with other settings than exported: {differ}")
    for name in manifest.get("extra_norms", []):
        if not hasattr(model.get_submodule(name), "extra_norm"):
            add_attention_norm(model.get_submodule(name))
    layout = manifest.get("activation_layout") or {}
    if layout:  # the exported record, whatever order the layouts were applied in
        model.pcpp_activation_layout = dict(layout)
    return model


def load(path: str | Path, *, verify: bool = True) -> nn.Module:
    """Rebuild an exported model, in honest binarized-eval mode and eval().

    The architecture comes from the manifest's recipe (pcpp.models.load), binarized through
    pcpp.surgery.binarize_ from the specs the manifest records (or, for older manifests, from its
    per-layer settings); then the 1-bit weights times their scales and every other tensor are loaded,
    each in the dtype it had when saved (fp32 also when the manifest's precision is fp16 or bf16).
    Raises FileNotFoundError for a missing file or manifest, ValueError for a corrupt or truncated file
    (sha256 checked unless verify=False), an unknown format, or a manifest that does not fit its recipe.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    if verify:
        digest = sha256_file(path)
        if digest != manifest["sha256"]:
            raise ValueError(f"export file {path} is corrupt or truncated: sha256 {digest[:12]}... does not match "
                             f"the manifest's {manifest['sha256'][:12]}...")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"export file {path} cannot be read: {e}") from None

    recipe = manifest["recipe"]
    model = _rebuild(manifest, path)

    state = {}
    bits, scales = tensors["binary.bits"], tensors["binary.scales"]
    for entry in manifest["layout"]:
        shape = torch.Size(entry["shape"])
        if entry["kind"] == "binary":
            n = shape.numel()
            chunk = bits[entry["byte_offset"]: entry["byte_offset"] + math.ceil(n / 8)]
            signs = unpack_signs(chunk, n).reshape(shape)
            s = scales[entry["scale_offset"]: entry["scale_offset"] + entry["scales"]].to(_dtype(entry["dtype"]))
            layer: BinaryMixin = model.get_submodule(_owner(entry["key"]))
            s = s.reshape(-1, *([1] * (len(shape) - 1))) if entry["scales"] > 1 else s.reshape(())
            layer.frozen_scale = s.clone()
            state[entry["key"]] = signs * s
        else:
            buf = tensors[f"flat.{entry['group']}"]
            key = entry["key"]
            value = buf[entry["offset"]: entry["offset"] + entry["numel"]].reshape(shape)
            if "dtype" in entry:  # stored at the export precision: back to the dtype it was saved from
                value = value.to(_dtype(entry["dtype"]))
            if key.endswith(".act_quantizer.beta"):  # exports before layer-owned thresholds: ReAct's own beta
                key = key[: -len("act_quantizer.beta")] + "act_threshold"
                value = value.expand(model.get_submodule(_owner(key)).input_channels).clone()
            state[key] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("frozen_scale")]
    if missing or unexpected:
        raise ValueError(f"{path}: export does not match {recipe['name']}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    set_binary_eval(model, True)
    return model.eval()
