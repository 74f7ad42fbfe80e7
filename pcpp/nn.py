"""Deprecated name of pcpp.layers (it shadowed torch.nn): every name of pcpp.layers, for one more release.

Importing it emits one DeprecationWarning per process; attribute access is forwarded to pcpp.layers, so
`pcpp.nn.BinaryConv2d is pcpp.layers.BinaryConv2d`.
"""

import types
import warnings

from pcpp import layers as _layers

warnings.warn("pcpp.nn is now pcpp.layers; the old name goes in the next release", DeprecationWarning, stacklevel=2)

# pcpp.layers' own public names: not the modules and __future__ features it imports (torch, nn, F, annotations)
_FEATURE = type(__import__("__future__").annotations)
__all__ = [n for n, v in vars(_layers).items()
           if not n.startswith("_") and not isinstance(v, (types.ModuleType, _FEATURE))]


def __getattr__(name: str):
    try:
        return getattr(_layers, name)
    except AttributeError:
        raise AttributeError(f"module 'pcpp.nn' (now pcpp.layers) has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(__all__) | {"__all__", "__doc__", "__name__"})
