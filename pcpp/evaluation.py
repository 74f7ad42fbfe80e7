"""The one evaluation of a (binarized) classifier: top-1 counts of the honest network.

Honest (docs/contracts.md, "Honest evaluation"): every binarized layer runs its true binary forward (sign of
the latent weight times its scale, sign of the thresholded activation, the 8-bit wrap for BWAA), the
figure every accuracy pcpp reports comes from. `honest=False` gives the training forward (the pairs'
F at the current schedule values), reported beside it so that a forward/binary gap is visible.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pcpp.layers import evaluation


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are (cpu for a model without any): where its inputs go."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter (float32 without one): what floating inputs are cast
    to, so that a half-precision model (fp16 under DeepSpeed) gets half inputs."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def as_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype` when it is floating (a half-precision model gets half inputs), else as is (indices)."""
    return x.to(dtype) if x.is_floating_point() else x


def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str | None = None,
             honest: bool = True) -> tuple[int, int]:
    """(correct, total) top-1 over `loader`'s (inputs, labels) batches.

    inputs: (N, ...) as the model expects; labels: (N,) class indices. The model runs in eval mode and,
    with honest=True, on its true binary forward; every module's flags are restored on exit. device:
    where batches go (default: the model's parameters' device). Total 0 for an empty loader.
    """
    device = model_device(model) if device is None else torch.device(device)
    dtype = model_dtype(model)
    correct = total = 0
    with evaluation(model, honest), torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            x = as_input(x, dtype)
            correct += int((model(x).argmax(1) == y).sum())
            total += y.numel()
    return correct, total


def accuracy(model: nn.Module, loader: Iterable, device: torch.device | str | None = None,
             honest: bool = True) -> float:
    """Top-1 accuracy in [0, 1] over `loader` (see `evaluate`).

    Raises ValueError when the loader yields no samples (an accuracy of nothing is not 0).
    """
    correct, total = evaluate(model, loader, device, honest=honest)
    if total == 0:
        raise ValueError("the evaluation loader yielded no samples")
    return correct / total
