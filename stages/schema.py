"""Typed configs from YAML: one reader, one builder, for train, pipeline and sweep configs and overrides.

- `read_yaml` / `apply_overrides` parse YAML keeping each scalar's text as written beside its value
  (`Scalar`), with YAML 1.2 floats (`1e-3`, `1E-3`, `.5` are numbers; PyYAML alone reads the first two
  as strings).
- `build(cls, data)` binds a dict to a dataclass by its annotations: a field typed `float` takes any
  number spelling, `int` an integral number, `str` the scalar's text (`name: 1.10` stays "1.10",
  `experiment: 2024` is "2024"), `bool` true/false; a wrong type (`lr: fast`) and an unknown key are
  errors naming the key. Every error of a document is reported at once (`ConfigError`), before anything
  runs (torchtune's rule).
- Fields marked `metadata=PATH` (or URI, DEEPSPEED) are paths: `absolute(cfg)` resolves the relative
  ones against the directory the command was run in, once, on the driver (cluster.local.resolve).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from cluster.local import DEEPSPEED_PRESETS, absolute_uri, resolve
from stages.hashing import digest

PATH = {"path": "file"}  # a file or directory
URI = {"path": "uri"}  # an MLflow tracking URI (relative sqlite / file stores made absolute)
DEEPSPEED = {"path": "deepspeed"}  # a DeepSpeed preset name (kept: it names a shipped file) or a JSON file
_RESOLVERS = {"file": lambda v, base: str(resolve(v, base)), "uri": absolute_uri,  # presets stay names:
              "deepspeed": lambda v, base: v if v in DEEPSPEED_PRESETS else str(resolve(v, base))}


class ConfigError(ValueError):
    """Every problem of one config document, one per line."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        text = errors[0] if len(errors) == 1 else f"{len(errors)} errors:\n  " + "\n  ".join(errors)
        super().__init__(text)


@dataclass(frozen=True)
class Scalar:
    """A YAML scalar: its text as written and its value as YAML resolves it."""

    text: str
    value: object


# -- reading YAML ------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    pass


_FLOAT_12 = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def _scalar(loader, node):
    return Scalar(node.value, yaml.SafeLoader.yaml_constructors[node.tag](loader, node))


for _tag in ("null", "bool", "int", "float", "str", "timestamp"):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _scalar)


def _mapping(loader, node):
    loader.flatten_mapping(node)
    pairs = loader.construct_pairs(node, deep=True)
    return {k.text if isinstance(k, Scalar) else k: v for k, v in pairs}


_Loader.add_constructor("tag:yaml.org,2002:map", _mapping)


def parse_yaml(text: str):
    """YAML text -> dicts / lists of `Scalar`s (mapping keys as the plain strings they were written as)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def plain(obj):
    """Scalars replaced by their values, recursively (free-form sections such as model.kwargs)."""
    if isinstance(obj, Scalar):
        return obj.value
    if isinstance(obj, dict):
        return {plain(k) if not isinstance(k, str) else k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return data


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """`key.sub=value` strings (values read as YAML, like the file) applied to a config dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. optim.lr=0.01)")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: the value is not valid YAML: {e}") from None
        node = data
        keys = key.strip().split(".")
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return data


def located(path: str | Path, overrides: list[str] | None, error: ValueError) -> ConfigError:
    """`error`'s messages prefixed with where the value came from: the command-line override that set the
    key a message names (`override 'frontier.keep=[9]': ...`; a key's value is the override's once one sets
    it, so an error about it or below it is the override's), else the file (`PATH: ...`, as one block)."""
    errors = error.errors if isinstance(error, ConfigError) else [str(error)]
    sources = [_override_of(message, overrides or []) for message in errors]
    if not any(sources):
        return ConfigError([f"{path}: {error}"])
    return ConfigError([f"{source or path}: {message}" for source, message in zip(sources, errors)])


def _override_of(message: str, overrides: list[str]) -> str | None:
    """The last override whose key, or a key below it, the message names before any `;` (the valid keys follow
    it), also without the key's section (a section's own checks say `keep_fp ...`, not `binarize.keep_fp`);
    None when none does."""
    head = message.split(";")[0]  # not the list of valid keys after it
    for item in reversed(overrides):
        key = item.split("=", 1)[0].strip()
        below = key.split(".", 1)[1] if "." in key else None
        # the key, or a key below it (key.sub); below its section, the name alone (data.train is not train.x)
        if re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", head) or (
                below and re.search(rf"(?<![\w.]){re.escape(below)}(?![\w.])", head)):
            return f"override {item!r}"
    return None


# -- binding to dataclasses --------------------------------------------------------------------------------
_FAILED = object()
_SCALAR_TYPES = (bool, int, float, str)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _union_args(tp) -> tuple | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _describe(tp) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             list: "a list", type(None): "null"}
    args = _union_args(tp)
    if args:
        return " or ".join(_describe(a) for a in args)
    origin = typing.get_origin(tp) or tp
    return names.get(origin, "a mapping" if _is_dataclass_type(tp) else getattr(tp, "__name__", str(tp)))


def _shown(value) -> str:
    if isinstance(value, Scalar):
        return repr(value.text)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _number(value, integral: bool):
    v = value.value if isinstance(value, Scalar) else value
    if isinstance(v, str):  # a number held as text (a dict from another YAML reader)
        text = v.strip()
        if not _FLOAT_12.match(text):
            return _FAILED
        v = float(text.replace("_", ""))
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return _FAILED
    if not integral:
        return float(v)
    if isinstance(v, float):
        return int(v) if v.is_integer() else _FAILED
    return v


def _scalar_as(tp, value):
    """`value` as the scalar type `tp`, or _FAILED."""
    if tp is bool:
        v = value.value if isinstance(value, Scalar) else value
        return v if isinstance(v, bool) else _FAILED
    if tp in (int, float):
        return _number(value, integral=tp is int)
    if tp is str:
        if isinstance(value, Scalar):
            return value.text if value.value is not None else _FAILED
        return value if isinstance(value, str) else _FAILED
    return _FAILED


def _convert(tp, value, path: str, errors: list[str]):
    if tp is typing.Any or tp is object:
        return plain(value)
    args = _union_args(tp)
    is_null = value is None or (isinstance(value, Scalar) and value.value is None)
    if is_null:
        if tp is type(None) or (args and type(None) in args):
            return None
        errors.append(f"{path}: expected {_describe(tp)}, got null")
        return _FAILED
    if args:
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            return _convert(members[0], value, path, errors)
        if isinstance(value, dict):
            fit = [a for a in members if (typing.get_origin(a) or a) is dict or _is_dataclass_type(a)]
        elif isinstance(value, list):
            fit = [a for a in members if (typing.get_origin(a) or a) is list]
        else:
            fit = [a for a in members if a in _SCALAR_TYPES]
            for a in fit:
                got = _scalar_as(a, value)
                if got is not _FAILED:
                    return got
            fit = []
        if fit:
            return _convert(fit[0], value, path, errors)
        errors.append(f"{path}: expected {_describe(tp)}, got {_shown(value)}")
        return _FAILED
    if _is_dataclass_type(tp):
        return _build(tp, value, path, errors)
    origin = typing.get_origin(tp) or tp
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {_shown(value)}")
            return _FAILED
        vt = (typing.get_args(tp) or (str, typing.Any))[1]
        out = {}
        for k, v in value.items():
            key = k.text if isinstance(k, Scalar) else k
            got = _convert(vt, v, f"{path}.{key}", errors)
            if got is _FAILED:
                return _FAILED
            out[key] = got
        return out
    if origin is list:
        it = (typing.get_args(tp) or (typing.Any,))[0]
        if not isinstance(value, (list, tuple)):
            if it is str and isinstance(value, (str, Scalar)) and _scalar_as(str, value) is not _FAILED:
                return _scalar_as(str, value)  # the dataclass decides (BinarizeSpec takes one pattern as a list)
            errors.append(f"{path}: expected a list, got {_shown(value)}")
            return _FAILED
        out = [_convert(it, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return _FAILED if any(v is _FAILED for v in out) else out
    if tp in _SCALAR_TYPES:
        got = _scalar_as(tp, value)
        if got is _FAILED:
            errors.append(f"{path}: expected {_describe(tp)}, got {_shown(value)}")
        return got
    return plain(value)


def _build(cls, data, where: str, errors: list[str]):
    if data is None or (isinstance(data, Scalar) and data.value is None):
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{where or cls.__name__}: expected a mapping, got {_shown(data)}")
        return _FAILED
    upgrade = getattr(cls, "upgrade", None)  # keys renamed in a past release, mapped with a DeprecationWarning
    if upgrade is not None:
        try:
            data = upgrade(dict(data), where)
        except ValueError as e:
            errors.append(str(e))
            return _FAILED
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = list(fields)
    failed = False
    for k in data:
        if k not in fields:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"unknown key {where + '.' if where else ''}{k}{hint}; valid keys: {', '.join(names)}")
            failed = True
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    for n in missing:
        errors.append(f"{where + '.' if where else ''}{n} is required")
        failed = True
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            continue
        got = _convert(hints[name], value, f"{where}.{name}" if where else name, errors)
        if got is _FAILED:
            failed = True
        else:
            kwargs[name] = got
    if failed:
        return _FAILED
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        errors.append(str(e) if str(e) else f"{where or cls.__name__}: {type(e).__name__}")
        return _FAILED


def renamed(data: dict, where: str, old: str, new: str, values: dict | None = None) -> dict:
    """`data` with the deprecated key `old` moved to `new` (dotted: "algorithm.rule"), warning once per use
    (DeprecationWarning naming the new key). `values` maps old values to new ones (any other is refused,
    naming the valid ones); giving both keys is an error."""
    if old not in data:
        return data
    at = f"{where}." if where else ""
    data = copy.deepcopy(data)  # the caller's mapping stays as it was
    *parents, leaf = new.split(".")
    node = data
    for k in parents:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"{at}{k}: expected a mapping, got {_shown(node)}")
    if leaf in node:
        raise ValueError(f"{at}{old} and {at}{new} are both given: {at}{old} is the old name of {at}{new}; keep one")
    value = data.pop(old)
    shown = value.text if isinstance(value, Scalar) else value
    if values is not None:
        plain_value = value.value if isinstance(value, Scalar) else value
        if plain_value not in values:
            raise ValueError(f"unknown {at}{old} {shown!r}; valid: {', '.join(map(str, values))} "
                             f"(deprecated: use {at}{new}: {' | '.join(map(str, values.values()))})")
        value = values[plain_value]
        shown_new = value
    else:
        shown_new = shown
    warnings.warn(f"config key {at}{old} is deprecated: use {at}{new}: {shown_new}", DeprecationWarning, stacklevel=2)
    node[leaf] = value
    return data


def build(cls, data, where: str = ""):
    """Dataclass `cls` from a dict (plain values or `Scalar`s); every error at once as a ConfigError."""
    errors: list[str] = []
    obj = _build(cls, data, where, errors)
    if errors or obj is _FAILED:
        raise ConfigError(errors or [f"{where or cls.__name__}: invalid"])
    return obj


# -- paths and round trip ----------------------------------------------------------------------------------
def absolute(cfg, base: str | Path | None = None):
    """A copy of a config whose relative paths (fields marked PATH / URI / DEEPSPEED) are absolute.

    `base` defaults to the current working directory: the directory the user ran the command from.
    """
    cfg = copy.deepcopy(cfg)
    _absolute_in_place(cfg, base)
    return cfg


def _absolute_in_place(obj, base) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kind = f.metadata.get("path")
        if kind and isinstance(value, str) and value:
            object.__setattr__(obj, f.name, _RESOLVERS[kind](value, base))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            _absolute_in_place(value, base)


class ConfigDocument:
    """Round trip of a top-level config dataclass: plain dict, YAML, and a short digest of its content."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        return digest(self.to_dict())
