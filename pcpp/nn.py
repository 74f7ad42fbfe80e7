"""Deprecated name of pcpp.layers (it shadowed torch.nn): every name of pcpp.layers, for one more release.

Importing it emits one DeprecationWarning per process; attribute access is forwarded to pcpp.layers, so
`pcpp.nn.BinaryConv2d is pcpp.layers.BinaryConv2d`.
"""

import warnings

from pcpp import layers as _layers

warnings.warn("pcpp.nn is now pcpp.layers; the old name goes in the next release", DeprecationWarning, stacklevel=2)

__all__ = [n for n in vars(_layers) if not n.startswith("_")]


def __getattr__(name: str):
    try:
        return getattr(_layers, name)
    except AttributeError:
        raise AttributeError(f"module 'pcpp.nn' (now pcpp.layers) has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(__all__) | {"__all__", "__doc__", "__name__"})
