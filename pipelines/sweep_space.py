"""A sweep's search space: dotted paths of the base pipeline's config, each with a Ray Tune search space.

`search:` in a sweep YAML maps a path of the base pipeline config (e.g. `train.optim.lr`,
`binarize.units`, `binarize.weight.mu.end`, `train.algorithm.params.rho.start`) to a space:

    {uniform: [lo, hi]}  {loguniform: [lo, hi]}  {randint: [lo, hi]} (both ends included)
    {choice: [a, b, ...]}  {grid: [a, b, ...]} (searcher random only: every value, num_samples times)
    {depends_on: PATH, cases: {a: SPACE or value, b: ...}}  a value that depends on another path's choice
    {low: lo, high: hi, log: false}  the form of earlier releases (uniform, or loguniform with log: true)

Quantizer specs (binarize.weight / binarize.activation) are searched through their mapping form: a path
`binarize.weight.mu.end` into a spec written as a name (`bnn++`) expands it to `{name: bnn++, mu: {kind,
start, end}}` with the pair's default schedule for that role (pcpp.specs.default_schedules), so that only
the searched field changes; the same for a rule's parameters (`train.algorithm.params.rho.end`).

Every space is checked at load, before Ray starts: the path exists (else the valid keys, with a
suggestion), a numeric space sits on a numeric field, and every value a space can give (both ends of a
range, every choice, every case with its parent's value) builds a valid pipeline config.
The short names of earlier releases stay: mu0 / muT (the weight pair's mu start / end), rho0 / rhoT (the
weight pair's rho, else the pq / rpc rule's), lr (train.optim.lr).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field

import yaml

from stages.config import ConfigError, build

KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
NUMERIC = ("uniform", "loguniform", "randint")
SEARCHERS = ("random", "optuna")
ALIASES = ("mu0", "muT", "rho0", "rhoT", "lr")
SCHEDULE_KEYS = ("kind", "start", "end")
HIDDEN = "|"  # `path|case`: a case's own sample in a trial's config (random: every case is drawn; optuna: one)


@dataclass
class Space:
    path: str
    kind: str  # one of KINDS, or "value" (a constant case of a conditional)
    args: list = field(default_factory=list)
    depends_on: str | None = None
    cases: dict[str, Space] = field(default_factory=dict)

    def describe(self) -> str:
        if self.depends_on:
            return f"depends on {self.depends_on}: " + "; ".join(f"{k}: {c.describe()}" for k, c in self.cases.items())
        return f"{self.kind}{self.args}" if self.kind != "value" else repr(self.args[0])

    def representatives(self) -> list:
        """The values that stand for the space at load: both ends of a range, every choice."""
        return list(self.args)


def case_key(value) -> str:
    """The `cases:` key a value of the parent path is matched with (as YAML writes it)."""
    return value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix(
        "\n...").strip()


def _unknown(where: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r} under {where or 'the pipeline'}{hint}; valid: {', '.join(valid) or '(none)'}"


# -- paths ---------------------------------------------------------------------------------------------------

def alias_path(name: str, base) -> str:
    """The dotted path an earlier release's short name stands for in this base pipeline."""
    if name == "lr":
        return "train.optim.lr"
    if name in ("mu0", "muT"):
        return f"binarize.weight.mu.{'start' if name == 'mu0' else 'end'}"
    end = "start" if name == "rho0" else "end"
    if "rho" in _pair_schedules(base.binarize.weight, "weight"):
        return f"binarize.weight.rho.{end}"
    return f"train.algorithm.params.rho.{end}"


def _pair_schedules(spec, role: str) -> dict:
    from pcpp.specs import default_schedules

    name = spec if isinstance(spec, str) else spec["name"]
    return default_schedules(name, role)


def _rule_schedules(rule: str) -> dict:
    from pcpp.rules import get_rule

    return dict(get_rule(rule).param_schedules)


def _schedule_leaf(rest: list[str], where: str, params: list[str], owner: str):
    if not rest:
        return "spec"
    if rest[0] not in params:
        raise ValueError(_unknown(where, rest[0], params) + f" ({owner})")
    if len(rest) == 1:
        return "schedule"
    if rest[1] not in SCHEDULE_KEYS or len(rest) > 2:
        raise ValueError(_unknown(f"{where}.{rest[0]}", ".".join(rest[1:]), list(SCHEDULE_KEYS)))
    return str if rest[1] == "kind" else float


def leaf_type(path: str, base):
    """The type of the value at `path` in the pipeline config `base` (a ValueError naming the valid keys)."""
    from pcpp.surgery import BinarizeSpec
    from stages.config import AlgorithmConfig

    parts = path.split(".")
    obj, tp = base, type(base)
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        if not dataclasses.is_dataclass(obj):
            raise ValueError(f"{where} holds a value ({obj!r}), not keys: {path!r} goes past it")
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            raise ValueError(_unknown(where, part, names))
        here = f"{where}.{part}" if where else part
        rest = parts[i + 1:]
        if isinstance(obj, BinarizeSpec) and part in BinarizeSpec.QUANTIZER_ROLES:
            spec = getattr(obj, part)
            if spec is None:
                if rest:
                    raise ValueError(f"{here} is not set in the base pipeline: name a pair there first")
                return "spec"
            if rest == ["name"]:
                return str
            name = spec if isinstance(spec, str) else spec["name"]
            return _schedule_leaf(rest, here, list(_pair_schedules(spec, part)), f"pair {name!r} as {part}")
        if isinstance(obj, AlgorithmConfig) and part == "params":
            return _schedule_leaf(rest, here, list(_rule_schedules(obj.rule)), f"rule {obj.rule!r}") \
                if rest else dict
        tp = typing.get_type_hints(type(obj))[part]
        obj = getattr(obj, part)
    if dataclasses.is_dataclass(obj):
        raise ValueError(f"{path} is a section, not a value; its keys: "
                         f"{', '.join(f.name for f in dataclasses.fields(obj))}")
    return tp


def _numeric(tp) -> tuple[bool, bool]:
    """(takes a float, takes an int) for a leaf type."""
    if tp in ("schedule",):
        return True, True
    members = typing.get_args(tp) or (tp,)
    return float in members, int in members or float in members


# -- applying values -----------------------------------------------------------------------------------------

def _expanded_schedule(cur, default) -> dict:
    if isinstance(cur, dict):
        return dict(cur)
    if isinstance(cur, (int, float)) and not isinstance(cur, bool):
        return {"kind": "constant", "start": cur, "end": cur}
    return default.to_dict()


def set_value(d: dict, path: str, value) -> None:
    """Set `path` in the pipeline dict `d` in place, expanding a quantizer spec or a rule's parameter to its
    mapping form on the way (the pair's / rule's defaults for the schedule it reaches)."""
    parts = path.split(".")
    if parts[0] == "binarize" and len(parts) > 2 and parts[1] in ("weight", "activation"):
        role = parts[1]
        spec = d["binarize"][role]
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        if parts[2] == "name":
            spec["name"] = value
        else:
            param = parts[2]
            sched = _expanded_schedule(spec.get(param), _pair_schedules(spec, role)[param])
            if len(parts) == 3:
                sched = value
            else:
                sched[parts[3]] = value
            spec[param] = sched
        d["binarize"][role] = spec
        return
    if parts[:3] == ["train", "algorithm", "params"] and len(parts) > 3:
        algorithm = d["train"]["algorithm"]
        params = dict(algorithm.get("params") or {})
        param = parts[3]
        if len(parts) == 4:
            params[param] = value
        else:
            sched = _expanded_schedule(params.get(param), _rule_schedules(algorithm["rule"])[param])
            sched[parts[4]] = value
            params[param] = sched
        algorithm["params"] = params
        return
    node = d
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def apply_values(base: dict, values: dict) -> dict:
    """The base pipeline dict with a trial's values set (shorter paths first: a pair before its schedule)."""
    d = copy.deepcopy(base)
    for path in sorted((p for p in values if HIDDEN not in p), key=lambda p: p.count(".")):
        set_value(d, path, values[path])
    return d


def trial_values(config: dict) -> dict:
    """A trial's sampled values by path (the cases' own draws left out), numpy scalars made Python's."""
    return {k: v.item() if type(v).__module__ == "numpy" else v for k, v in config.items() if HIDDEN not in k}


# -- parsing and checking ------------------------------------------------------------------------------------

def _number(x, where: str):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{where}: expected a finite number, got {x!r}")
    return x


def _parse(path: str, raw, where: str, tp, *, in_case: bool = False) -> Space:
    if not isinstance(raw, dict):
        if in_case:
            return Space(path, "value", [raw])
        raise ValueError(f"{where}: expected a mapping such as {{uniform: [lo, hi]}} or {{choice: [a, b]}}, "
                         f"got {raw!r}; spaces: {', '.join(KINDS)}, depends_on")
    if "depends_on" in raw or "cases" in raw:
        if in_case:
            raise ValueError(f"{where}: a case cannot depend on another path (one level of depends_on)")
        extra = sorted(set(raw) - {"depends_on", "cases"})
        if extra or not isinstance(raw.get("cases"), dict) or not raw["cases"] or not raw.get("depends_on"):
            raise ValueError(f"{where}: a conditional space is {{depends_on: PATH, cases: {{value: SPACE or value, "
                             f"...}}}}, got {raw!r}")
        cases = {str(k): _parse(path, v, f"{where}.cases.{k}", tp, in_case=True) for k, v in raw["cases"].items()}
        return Space(path, "conditional", depends_on=str(raw["depends_on"]), cases=cases)
    if set(raw) <= {"low", "high", "log"}:  # the form of earlier releases
        for k in ("low", "high"):
            if k not in raw:
                raise ValueError(f"{where}.{k} is required")
        raw = {"loguniform" if raw.get("log") else "uniform": [raw["low"], raw["high"]]}
    if len(raw) != 1 or next(iter(raw)) not in KINDS:
        key = next(iter(raw)) if len(raw) == 1 else sorted(raw)
        close = difflib.get_close_matches(str(key), KINDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{where}: unknown space {key!r}{hint}; valid: one of {', '.join(KINDS)}, or depends_on")
    (kind, args), = raw.items()
    if kind == "grid" and in_case:
        raise ValueError(f"{where}: a case cannot be a grid (use choice)")
    if not isinstance(args, list) or not args:
        raise ValueError(f"{where}.{kind}: expected a non-empty list, got {args!r}")
    if kind in NUMERIC:
        takes_float, takes_int = _numeric(tp)
        if not takes_int:
            raise ValueError(f"{where}: {kind} needs a numeric field, but {path} holds "
                             f"{getattr(tp, '__name__', tp)}; use choice or grid")
        if kind != "randint" and not takes_float:
            raise ValueError(f"{where}: {path} holds an integer: use randint, choice or grid, not {kind}")
        if len(args) != 2:
            raise ValueError(f"{where}.{kind}: expected [lo, hi], got {args!r}")
        lo, hi = (_number(x, f"{where}.{kind}") for x in args)
        if not lo < hi:
            raise ValueError(f"{where}.{kind}: a search range needs lo < hi, got [{lo}, {hi}]")
        if kind == "loguniform" and lo <= 0:
            raise ValueError(f"{where}.{kind}: a log range needs lo > 0, got {lo}")
        if kind == "randint" and not all(isinstance(x, int) for x in (lo, hi)):
            raise ValueError(f"{where}.randint: expected integers, got {args!r}")
        return Space(path, kind, [lo, hi])
    return Space(path, kind, list(args))


def _check_builds(base_dict: dict, values: dict, where: str) -> None:
    from pipelines.config import PipelineConfig

    try:
        build(PipelineConfig, apply_values(base_dict, values))
    except (ValueError, TypeError, KeyError) as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise ValueError(f"{where}: {shown} is refused by the base pipeline: {e}") from None


def parse_search(search: dict, base, searcher: str = "random") -> dict[str, Space]:
    """The sweep's `search:` as Spaces keyed by dotted path; every problem at once, as a ConfigError."""
    if searcher not in SEARCHERS:
        raise ConfigError([f"unknown searcher {searcher!r}; valid: {', '.join(SEARCHERS)}"])
    errors, spaces = [], {}
    base_dict = base.to_dict()
    for name, raw in search.items():
        where = f"search.{name}"
        try:
            path = alias_path(name, base) if name in ALIASES else name
            tp = leaf_type(path, base)
            if path in spaces:
                raise ValueError(f"{path} is searched twice")
            spaces[path] = _parse(path, raw, where, tp)
        except (ValueError, KeyError) as e:
            errors.append(f"{where}: {e}" if not str(e).startswith(where) else str(e))
    for path, s in spaces.items():
        where = f"search.{path}"
        try:
            _check_space(s, spaces, searcher, base_dict, where)
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError(errors)
    return spaces


def _check_space(s: Space, spaces: dict[str, Space], searcher: str, base_dict: dict, where: str) -> None:
    if s.kind != "conditional":
        if s.kind == "grid" and searcher != "random":
            raise ValueError(f"{where}: grid needs searcher random (Optuna samples; use choice)")
        if searcher == "optuna" and s.kind in ("choice",):
            _optuna_values(s, where)
        for v in s.representatives():
            _check_builds(base_dict, {s.path: v}, where)
        return
    parent = spaces.get(s.depends_on)
    if parent is None or parent.kind not in ("choice", "grid"):
        choices = [p for p, o in spaces.items() if o.kind in ("choice", "grid") and p != s.path]
        raise ValueError(f"{where}.depends_on: {s.depends_on!r} is not a searched choice or grid; "
                         f"searched ones: {', '.join(choices) or '(none)'}")
    keys = {case_key(v): v for v in parent.args}
    missing, extra = sorted(set(keys) - set(s.cases)), sorted(set(s.cases) - set(keys))
    if missing or extra:
        raise ValueError(f"{where}.cases: one case per value of {s.depends_on} ({', '.join(keys)}); "
                         + (f"missing: {', '.join(missing)}" if missing else f"unknown: {', '.join(extra)}"))
    for key, case in s.cases.items():
        if searcher == "optuna" and case.kind == "choice":
            _optuna_values(case, f"{where}.cases.{key}")
        for v in case.representatives():
            _check_builds(base_dict, {s.depends_on: keys[key], s.path: v}, f"{where}.cases.{key}")


def _optuna_values(s: Space, where: str) -> None:
    bad = [v for v in s.args if not (v is None or isinstance(v, (bool, int, float, str)))]
    if bad:
        raise ValueError(f"{where}: Optuna chooses among None, bool, int, float and str only, got {bad[0]!r}")


# -- Ray Tune ------------------------------------------------------------------------------------------------

def _domain(s: Space):
    from ray import tune

    if s.kind == "value":
        return s.args[0]
    if s.kind == "uniform":
        return tune.uniform(*s.args)
    if s.kind == "loguniform":
        return tune.loguniform(*s.args)
    if s.kind == "randint":
        return tune.randint(s.args[0], s.args[1] + 1)  # Tune's upper end is excluded, ours included
    if s.kind == "choice":
        return tune.choice(s.args)
    return tune.grid_search(s.args)


class _Case:
    """tune.sample_from's function of a conditional: the draw of the case the parent's value selects."""

    def __init__(self, path: str, parent: str):
        self.path, self.parent = path, parent

    def __call__(self, spec):
        return spec.config[f"{self.path}{HIDDEN}{case_key(spec.config[self.parent])}"]


def tune_param_space(spaces: dict[str, Space]) -> dict:
    """The Tuner's param_space (searcher random): a Tune domain per path; a conditional draws every case
    (under `path|case`) and takes the one its parent's value selects (tune.sample_from)."""
    from ray import tune

    out = {}
    for path, s in spaces.items():
        if s.kind != "conditional":
            out[path] = _domain(s)
            continue
        for key, case in s.cases.items():
            out[f"{path}{HIDDEN}{key}"] = _domain(case)
        out[path] = tune.sample_from(_Case(path, s.depends_on))
    return out


class OptunaSpace:
    """OptunaSearch's define-by-run space: Optuna's own conditional parameters (`path|case` names)."""

    def __init__(self, spaces: dict[str, Space]):
        self.spaces = spaces

    @staticmethod
    def _suggest(trial, name: str, s: Space):
        if s.kind == "value":
            return s.args[0]
        if s.kind == "uniform":
            return trial.suggest_float(name, *s.args)
        if s.kind == "loguniform":
            return trial.suggest_float(name, *s.args, log=True)
        if s.kind == "randint":
            return trial.suggest_int(name, *s.args)
        return trial.suggest_categorical(name, s.args)

    def __call__(self, trial) -> dict:
        got, extra = {}, {}
        for path, s in self.spaces.items():
            if s.kind != "conditional":
                got[path] = self._suggest(trial, path, s)
        for path, s in self.spaces.items():
            if s.kind == "conditional":
                key = case_key(got[s.depends_on])
                case = s.cases[key]
                extra[path] = self._suggest(trial, f"{path}{HIDDEN}{key}", case)
        return extra


def search_alg(spaces: dict[str, Space], searcher: str, seed: int, metric: str, mode: str, max_concurrent: int):
    """(the Tuner's param_space, its search_alg), seeded: Tune's BasicVariantGenerator (random, grid) or
    Optuna's TPE through Tune's OptunaSearch, at most `max_concurrent` trials at a time."""
    if searcher == "random":
        from ray.tune.search import BasicVariantGenerator

        return tune_param_space(spaces), BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    alg = OptunaSearch(space=OptunaSpace(spaces), metric=metric, mode=mode,
                       sampler=optuna.samplers.TPESampler(seed=seed))
    return {}, ConcurrencyLimiter(alg, max_concurrent=max_concurrent)


__all__ = ["ALIASES", "KINDS", "SEARCHERS", "OptunaSpace", "Space", "apply_values", "case_key", "leaf_type",
           "parse_search", "search_alg", "set_value", "trial_values", "tune_param_space"]
