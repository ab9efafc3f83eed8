"""Suite defaults + ``key=value`` overrides -> one validated run configuration.

Resolution order (later wins): divebench's defaults (``KEYS``), the suite's YAML
``defaults``, then the command line. ``suite=`` and ``policy=`` are resolved first
because they decide which keys exist. Every value remembers where it came from
(``--show-config``). Every user error raises :class:`ConfigError` with one line that
names the key, what was wrong and what would be right.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from divebench.policy import Policy, PolicyConfig, SuiteContext


class ConfigError(Exception):
    """A user error in the configuration: printed as one line, exit code 2."""


@dataclass(frozen=True)
class Key:
    type: Any
    default: Any
    help: str
    group: str = "train"


# Every run-level key, its type, default and meaning. Suites override defaults.
KEYS: dict[str, Key] = {
    # what to run
    "suite": Key(str, "mnist1d", "suite name (divebench suites)", "run"),
    "policy": Key(list[str], None, "entries or policy names to run, comma-separated (default: the suite's entries)", "run"),
    "seeds": Key(list[int], [0], "seeds, comma-separated", "run"),
    "device": Key(Literal["auto", "cpu", "cuda"], "auto", "training device; auto picks CUDA when present", "run"),
    "results_dir": Key(str, "results", "root folder of the run folders", "run"),
    "wandb": Key(Literal["off", "offline", "online", "auto"], "auto", "W&B mode; auto = online when logged in, else offline", "run"),
    "wandb_project": Key(str, "divebench", "W&B project", "run"),
    "resume": Key(str, "", "run id to resume, or 'auto' for the newest unfinished run of this config", "run"),
    "keep_checkpoint": Key(bool, True, "keep checkpoint.pt (final weights and optimiser state) when a run completes; false deletes it (ResNet-18: about 90 MB a run)", "run"),
    # data and model
    "dataset": Key(str, "synthetic", "data source (registered by plugins)", "data"),
    "data": Key(Literal["real", "fake"], "real", "real files, or fake data of the same shapes (smoke runs, tests)", "data"),
    "n_samples": Key(int, 0, "samples to generate (synthetic, mnist1d; 0 = the source's default)", "data"),
    "subset": Key(int, 0, "use only the first N training samples (0 = all)", "data"),
    "data_dir": Key(str, "", "where the dataset files are (default: $DIVEBENCH_DATA or ~/.cache/divebench)", "data"),
    "download": Key(bool, False, "download missing dataset files (needs a network)", "data"),
    "preset": Key(str, "", "dataset preset (e.g. tinyimagenet: paper | native)", "data"),
    "augment": Key(bool, True, "training-time augmentation", "data"),
    "model": Key(str, "mlp", "model builder name", "data"),
    # optimisation
    "epochs": Key(int, 10, "training epochs", "train"),
    "batch_size": Key(int, 32, "initial (small) batch size B0", "train"),
    "max_batch_size": Key(int, 512, "largest batch size B_max", "train"),
    "max_micro_batch": Key(int, 4096, "largest micro-batch; larger logical batches accumulate gradients", "train"),
    "eval_batch_size": Key(int, 2048, "batch size of evaluation", "train"),
    "lr": Key(float, 0.1, "base learning rate", "train"),
    "lr_schedule": Key(Literal["constant", "cosine", "multistep", "step"], "constant", "base LR schedule over epochs", "train"),
    "lr_milestones": Key(list[int], [], "epochs where multistep multiplies the LR by lr_gamma", "train"),
    "lr_gamma": Key(float, 0.1, "LR factor at each multistep milestone / step", "train"),
    "lr_step_size": Key(int, 30, "epochs between LR steps (step schedule)", "train"),
    "momentum": Key(float, 0.9, "SGD momentum", "train"),
    "weight_decay": Key(float, 0.0, "SGD weight decay", "train"),
    "nesterov": Key(bool, False, "Nesterov momentum", "train"),
    "amp": Key(Literal["off", "bf16"], "off", "mixed precision: bf16 autocast on the training device (CUDA; or a CPU with native bf16, e.g. AVX512-BF16/AMX)", "train"),
    "dtype": Key(Literal["float32", "float64"], "float32", "floating-point type of the weights, inputs and gradients; float64 makes CPU results independent of the processor's vector path (the golden checks, bench/test_golden.py) at up to 7x the time on large conv nets (README)", "train"),
    "compile": Key(bool, False, "torch.compile the model", "train"),
    "threads": Key(int, 0, "CPU threads for torch (0 = torch's default); 1 avoids thread contention on a busy machine", "run"),
    # scoring
    "target_accuracy": Key(float, 0.0, "fixed target (fraction) for time-to-target; 0 = none", "score"),
    "baseline": Key(str, "", "entry that speed-ups are measured against", "score"),
}

SUITE_TOP_KEYS = {"name", "description", "defaults", "entries", "includes", "notes"}


@dataclass(frozen=True)
class Entry:
    """A named policy configuration of a suite (e.g. ``sgd-large``)."""

    name: str
    policy: str
    params: dict[str, Any]


@dataclass
class Suite:
    name: str
    description: str
    defaults: dict[str, Any]
    entries: dict[str, Entry]
    includes: list[str] = field(default_factory=list)
    path: Path | None = None
    notes: str = ""


@dataclass
class RunConfig:
    """The resolved configuration of one suite invocation (all entries, all seeds)."""

    suite: Suite
    values: dict[str, Any]
    sources: dict[str, str]
    entries: list[Entry]  # the selected entries, with command-line overrides applied
    entry_sources: dict[str, dict[str, str]]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def to_dict(self, entry: Entry | None = None, seed: int | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"suite": self.suite.name, **{k: v for k, v in self.values.items() if k != "suite"}}
        if entry is not None:
            d["entry"] = entry.name
            d["policy_name"] = entry.policy
            d["policy_config"] = dict(entry.params)
        if seed is not None:
            d["seed"] = seed
        return d


# ----------------------------------------------------------------------------- types


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"comma-separated list of {type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to ``tp`` or raise ConfigError."""
    bad = ConfigError(f"{key}={value!r} is not valid: expected {type_name(tp)}")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        choices = typing.get_args(tp)
        sval = str(value).lower() if isinstance(value, bool) else str(value)
        for c in choices:
            if sval == str(c):
                return c
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            items: list[Any] = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        elif value is None:
            items = []
        else:
            items = [value]
        try:
            return [coerce(v, inner, key) for v in items]
        except ConfigError:
            raise bad from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(str(value))
        except ValueError:
            raise bad from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise bad
        return "" if value is None else str(value)
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def policy_fields(policy_cls: type[Policy]) -> dict[str, tuple[Any, Any]]:
    """The config keys of a policy: name -> (type, default)."""
    cls = policy_cls.config_class
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out[f.name] = (hints[f.name], default)
    return out


def suggest(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


# ----------------------------------------------------------------------------- suites


def builtin_suite_paths() -> list[Path]:
    root = resources.files("divebench.suites")
    return sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"suite file {path} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"suite file {path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"suite file {path} must hold a mapping with 'name', 'defaults' and 'entries'")
    return data


def suite_name_of(path: Any) -> str:
    data = _read_yaml(Path(path))
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        raise ConfigError(f"suite file {path}: 'name' must be a lower-case identifier, got {name!r}")
    return name


def load_suite(path: Path) -> Suite:
    """Parse and check a suite YAML file."""
    data = _read_yaml(path)
    unknown = set(data) - SUITE_TOP_KEYS
    if unknown:
        k = sorted(unknown)[0]
        raise ConfigError(f"suite file {path}: unknown top-level key '{k}'{suggest(k, SUITE_TOP_KEYS)} (allowed: {', '.join(sorted(SUITE_TOP_KEYS))})")
    name = suite_name_of(path)
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"suite file {path}: 'defaults' must be a mapping of key: value")
    for k, v in defaults.items():
        if k not in KEYS or k in ("suite", "resume"):
            raise ConfigError(f"suite file {path}: unknown key '{k}' in defaults{suggest(str(k), KEYS)}")
        defaults[k] = coerce(v, KEYS[k].type, f"{path.name}: {k}")
    includes = data.get("includes") or []
    entries: dict[str, Entry] = {}
    raw_entries = data.get("entries") or {}
    if not isinstance(raw_entries, dict):
        raise ConfigError(f"suite file {path}: 'entries' must map entry names to {{policy: NAME, ...}}")
    for ename, spec in raw_entries.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("policy"), str):
            raise ConfigError(f"suite file {path}: entry '{ename}' needs 'policy: NAME'")
        params = {k: v for k, v in spec.items() if k != "policy"}
        entries[str(ename)] = Entry(str(ename), spec["policy"], params)
    if not entries and not includes:
        raise ConfigError(f"suite file {path}: needs 'entries' (or 'includes' of other suites)")
    return Suite(name, str(data.get("description", "")), defaults, entries, list(includes), path, str(data.get("notes", "")))


def get_suite(name: str, registry: Any) -> Suite:
    if name not in registry.suites:
        raise ConfigError(f"unknown suite '{name}'{suggest(name, registry.suites)} (available: {', '.join(sorted(registry.suites))})")
    return load_suite(Path(registry.suites[name][0]))


# ----------------------------------------------------------------------------- resolution


def parse_overrides(tokens: typing.Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for tok in tokens:
        if "=" not in tok:
            raise ConfigError(f"argument '{tok}' is not key=value (e.g. suite=mnist1d epochs=5)")
        k, v = tok.split("=", 1)
        k = k.strip()
        if not k:
            raise ConfigError(f"argument '{tok}' has no key before '='")
        if k in out:
            raise ConfigError(f"key '{k}' is given twice on the command line")
        out[k] = v
    return out


_INTERP = re.compile(r"^\$\{([a-z_]+)\}$")


def _interpolate(value: Any, values: dict[str, Any], where: str) -> Any:
    if isinstance(value, str):
        m = _INTERP.match(value.strip())
        if m:
            if m.group(1) not in values:
                raise ConfigError(f"{where}: '${{{m.group(1)}}}' names no run key{suggest(m.group(1), values)}")
            return values[m.group(1)]
    return value


def resolve(overrides: dict[str, str], registry: Any, suite_name: str | None = None) -> RunConfig:
    """Resolve one suite's configuration (for a composite suite, call per included suite)."""
    overrides = dict(overrides)
    name = suite_name or overrides.get("suite", KEYS["suite"].default)
    suite = get_suite(name, registry)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for k, spec in KEYS.items():
        values[k], sources[k] = spec.default, "default"
    for k, v in suite.defaults.items():
        values[k], sources[k] = v, f"suite {suite.name}"
    values["suite"], sources["suite"] = suite.name, ("command line" if "suite" in overrides else "default")

    # --- cross.<key>=v1,v2: each entry whose policy has <key> becomes one entry per value
    cross = {k.split(".", 1)[1]: overrides.pop(k) for k in [k for k in overrides if k.startswith("cross.")]}

    # --- which entries (and so which policy keys exist)
    policy_token = overrides.pop("policy", None)
    overrides.pop("suite", None)
    if policy_token is not None:
        wanted = coerce(policy_token, list[str], "policy")
        if not wanted:
            raise ConfigError("policy= is empty: name one or more entries or policies, comma-separated")
        twice = sorted({w for w in wanted if wanted.count(w) > 1})
        if twice:
            raise ConfigError(f"policy= names '{twice[0]}' twice: list each entry once")
        selected: list[Entry] = []
        for w in wanted:
            if w in suite.entries:
                selected.append(suite.entries[w])
            elif w in registry.policies:
                selected.append(Entry(w, w, {}))
            else:
                opts = list(suite.entries) + list(registry.policies)
                raise ConfigError(f"unknown policy or entry '{w}' in suite {suite.name}{suggest(w, opts)} (entries: {', '.join(suite.entries)}; policies: {', '.join(sorted(registry.policies))})")
        values["policy"], sources["policy"] = [e.name for e in selected], "command line"
    else:
        selected = list(suite.entries.values())
        values["policy"], sources["policy"] = [e.name for e in selected], f"suite {suite.name}"
    for e in selected:
        if e.policy not in registry.policies:
            raise ConfigError(f"suite {suite.name}: entry '{e.name}' uses unknown policy '{e.policy}'{suggest(e.policy, registry.policies)}")

    # --- run-level overrides
    dotted = {k: v for k, v in overrides.items() if "." in k}
    for k, v in overrides.items():
        if k in dotted:
            continue
        if k not in KEYS:
            owners = [e.policy for e in selected if k in policy_fields(registry.policies[e.policy][0])]
            if owners:
                hint = f"; it is a key of policy {owners[0]}: write '{owners[0]}.{k}={v}'"
            else:
                hint = suggest(k, KEYS)
            raise ConfigError(f"unknown key '{k}'{hint} (run keys: divebench run --keys)")
        values[k], sources[k] = coerce(v, KEYS[k].type, k), "command line"

    # --- entries: params from the suite, then <policy>.<key> / <entry>.<key> overrides
    entries: list[Entry] = []
    entry_sources: dict[str, dict[str, str]] = {}
    used: set[str] = set()
    for e in selected:
        cls = registry.policies[e.policy][0]
        fields_ = policy_fields(cls)
        params: dict[str, Any] = {}
        src: dict[str, str] = {}
        for k, (_tp, default) in fields_.items():
            if default is not dataclasses.MISSING:
                params[k], src[k] = default, f"policy {e.policy}"
        for k, v in e.params.items():
            if k not in fields_:
                raise ConfigError(f"suite {suite.name}: entry '{e.name}' sets unknown key '{k}' of policy {e.policy}{suggest(k, fields_)} (keys: {', '.join(fields_) or 'none'})")
            params[k], src[k] = v, f"suite {suite.name}"
        # <policy>.<key> first, then <entry>.<key>: the more specific one wins
        ordered = sorted(dotted.items(), key=lambda kv: kv[0].split(".", 1)[0] == e.name)
        for dk, v in ordered:
            prefix, key = dk.split(".", 1)
            if prefix not in (e.name, e.policy):
                continue
            if key not in fields_:
                raise ConfigError(f"unknown key '{dk}': policy {e.policy} has no key '{key}'{suggest(key, fields_)} (keys: {', '.join(fields_) or 'none'})")
            params[key], src[key] = v, "command line"
            used.add(dk)
        for k, (tp, _default) in fields_.items():
            if k not in params:
                raise ConfigError(f"entry '{e.name}': policy {e.policy} needs '{e.policy}.{k}' ({type_name(tp)})")
            params[k] = coerce(_interpolate(params[k], values, f"{e.name}.{k}"), tp, f"{e.policy}.{k}")
        entries.append(Entry(e.name, e.policy, params))
        entry_sources[e.name] = src
    for dk in dotted:
        if dk not in used:
            prefix = dk.split(".", 1)[0]
            known = [e.name for e in selected] + [e.policy for e in selected]
            owner = suite.entries[prefix].policy if prefix in suite.entries else prefix
            if owner in registry.policies:
                # A key of a policy this run does not include (e.g. a sweep's grid over
                # divebatch.delta while running sgd): harmless, but it must exist.
                fields_ = policy_fields(registry.policies[owner][0])
                key = dk.split(".", 1)[1]
                if key not in fields_:
                    raise ConfigError(f"unknown key '{dk}': policy {owner} has no key '{key}'{suggest(key, fields_)} (keys: {', '.join(fields_) or 'none'})")
                coerce(dotted[dk], fields_[key][0], f"{owner}.{key}")  # a typo in a value still fails
                continue
            raise ConfigError(f"unknown key '{dk}': '{prefix}' is no policy or entry of this run{suggest(prefix, known)}")

    if cross:
        entries, entry_sources = cross_entries(cross, entries, entry_sources, registry, values.get("baseline") or "")
        values["policy"], sources["policy"] = [e.name for e in entries], "cross"
    cfg = RunConfig(suite, values, sources, entries, entry_sources)
    validate(cfg, registry)
    return cfg


def cross_entries(
    cross: dict[str, str], entries: list[Entry], entry_sources: dict[str, dict[str, str]], registry: Any,
    baseline: str = "",
) -> tuple[list[Entry], dict[str, dict[str, str]]]:
    """``cross.<key>=v1,v2,...`` (several keys: their product): each entry whose policy has
    ``<key>`` becomes one entry per value (per combination), named ``<entry>+<value>+...``
    in the order the keys were given; an entry whose policy has none of the keys runs once,
    as it is (no duplicate runs), and so does the suite's ``baseline`` entry, the
    reference every crossed entry's speed-up is measured against. A value a policy's type does not allow skips that
    combination for that policy (``gns`` has no ``estimator=epoch``); a key no selected
    policy has, or a value no selected policy allows, is an error."""
    grid: dict[str, list[str]] = {}
    for key, token in cross.items():
        vals = [v.strip() for v in str(token).split(",") if v.strip()]
        if not key or not vals:
            raise ConfigError(f"cross.{key}= is empty: give comma-separated values, e.g. cross.lr_scaling=none,sqrt")
        if len(set(vals)) != len(vals):
            raise ConfigError(f"cross.{key}= lists a value twice: {token}")
        grid[key] = vals
    owners = {key: [e for e in entries if key in policy_fields(registry.policies[e.policy][0])
                    and e.name != baseline] for key in grid}
    for key, have in owners.items():
        if not have:
            if any(e.name == baseline and key in policy_fields(registry.policies[e.policy][0]) for e in entries):
                raise ConfigError(f"cross.{key}: only the baseline entry '{baseline}' has '{key}', and the "
                                  "baseline is not crossed (every speed-up is measured against it): select "
                                  "another entry of its policy, or set baseline=")
            pols = sorted({e.policy for e in entries})
            raise ConfigError(f"cross.{key}: no policy of this run has a key '{key}' (policies: {', '.join(pols)}; "
                              "see divebench policies)")
    allowed: dict[str, set[str]] = {k: set() for k in grid}
    errors: dict[str, str] = {}
    out: list[Entry] = []
    sources: dict[str, dict[str, str]] = {}
    for e in entries:
        fields_ = policy_fields(registry.policies[e.policy][0])
        keys = [k for k in grid if k in fields_] if e.name != baseline else []
        if not keys:
            out.append(e)
            sources[e.name] = entry_sources[e.name]
            continue
        for k in keys:
            if entry_sources[e.name].get(k) == "command line":
                named = e.policy if e.name == e.policy else f"{e.policy} (or {e.name})"
                raise ConfigError(f"{named}.{k} and cross.{k} are both given: "
                                  f"cross.{k} would override it; give the values in cross.{k} only")
        combos: list[list[tuple[str, str, Any]]] = [[]]
        for k in keys:
            nxt = []
            for v in grid[k]:
                try:
                    val = coerce(v, fields_[k][0], f"{e.policy}.{k}")
                except ConfigError as exc:
                    errors.setdefault(f"{k}={v}", str(exc))
                    continue
                allowed[k].add(v)
                nxt += [c + [(k, v, val)] for c in combos]
            combos = nxt
        if not combos:  # every value of some key is one this policy does not allow
            raise ConfigError(f"cross: entry '{e.name}' (policy {e.policy}) would not run at all: "
                              f"{'; '.join(errors.values())}; drop it from policy= or add a value it allows")
        for combo in combos:
            name = "+".join([e.name, *(v for _k, v, _val in combo)])
            if name in sources:
                raise ConfigError(f"cross: two entries would be named '{name}'; cross keys whose values differ")
            out.append(Entry(name, e.policy, {**e.params, **{k: val for k, _v, val in combo}}))
            sources[name] = {**entry_sources[e.name], **{k: "cross" for k, _v, _val in combo}}
    for key, vals in grid.items():
        for v in vals:
            if v not in allowed[key]:
                raise ConfigError(errors.get(f"{key}={v}", f"cross.{key}={v} is allowed by no policy of this run"))
    return out, sources


def lr_schedule(v: dict[str, Any]) -> Callable[[int], float]:
    """The suite's base LR as a function of the (0-based) epoch."""
    lr, epochs, kind = v["lr"], v["epochs"], v["lr_schedule"]
    if kind == "cosine":
        return lambda e: lr * 0.5 * (1 + math.cos(math.pi * e / epochs))
    if kind == "multistep":
        ms = sorted(v["lr_milestones"])
        return lambda e: lr * v["lr_gamma"] ** sum(e >= m for m in ms)
    if kind == "step":
        return lambda e: lr * v["lr_gamma"] ** (e // v["lr_step_size"])
    return lambda e: lr


def suite_context(cfg: RunConfig, dataset_size: int, seed: int) -> SuiteContext:
    v = cfg.values
    base = lr_schedule(v)
    return SuiteContext(cfg.suite.name, dataset_size, v["batch_size"], v["max_batch_size"], v["epochs"], v["lr"], seed,
                        lr_by_epoch=tuple(base(e) for e in range(v["epochs"])))


def make_policy_config(entry: Entry, registry: Any) -> PolicyConfig:
    cls = registry.policies[entry.policy][0]
    return typing.cast(PolicyConfig, cls.config_class(**entry.params))


def validate(cfg: RunConfig, registry: Any, dataset_size: int | None = None) -> None:
    """Range checks that need no data; with ``dataset_size`` also those that do."""
    v = cfg.values
    for k in ("epochs", "batch_size", "max_batch_size", "max_micro_batch", "eval_batch_size", "lr_step_size"):
        if v[k] < 1:
            raise ConfigError(f"{k}={v[k]} is not valid: expected an int >= 1")
    for k in ("n_samples", "subset"):
        if v[k] < 0:
            raise ConfigError(f"{k}={v[k]} is not valid: expected an int >= 0 (0 = default)")
    if not (0 < v["lr"] < float("inf")):
        raise ConfigError(f"lr={v['lr']} is not valid: expected a finite number > 0")
    if not (0 < v["lr_gamma"] < float("inf")):
        raise ConfigError(f"lr_gamma={v['lr_gamma']} is not valid: expected a finite number > 0")
    if v["lr_schedule"] == "multistep" and not v["lr_milestones"]:
        raise ConfigError("lr_schedule=multistep needs lr_milestones=E1,E2,... (epochs where the LR is multiplied by lr_gamma)")
    if any(m < 1 for m in v["lr_milestones"]):
        raise ConfigError(f"lr_milestones={','.join(map(str, v['lr_milestones']))} is not valid: expected epochs >= 1")
    if v["threads"] < 0:
        raise ConfigError(f"threads={v['threads']} is not valid: expected an int >= 1 (0 = torch's default)")
    if len(set(v["seeds"])) != len(v["seeds"]):
        raise ConfigError(f"seeds={','.join(map(str, v['seeds']))} lists a seed twice: list each seed once")
    if not 0 <= v["momentum"] < 1:
        raise ConfigError(f"momentum={v['momentum']} is not valid: expected 0 <= momentum < 1")
    if not 0 <= v["weight_decay"] < float("inf"):
        raise ConfigError(f"weight_decay={v['weight_decay']} is not valid: expected a finite number >= 0")
    # the optimiser works in float32: an LR or a weight decay beyond float32's range
    # overflows in the first step
    f32_max = 3.4028234663852886e38
    if v["lr"] > f32_max:
        raise ConfigError(f"lr={v['lr']} is not valid: it overflows float32; expected lr <= {f32_max:.3g}")
    if v["weight_decay"] > f32_max:
        raise ConfigError(f"weight_decay={v['weight_decay']} is not valid: it overflows float32; expected <= {f32_max:.3g}")
    if not 0 <= v["target_accuracy"] <= 1:
        raise ConfigError(f"target_accuracy={v['target_accuracy']} is not valid: expected a fraction in [0, 1]")
    if v["batch_size"] > v["max_batch_size"]:
        raise ConfigError(f"batch_size={v['batch_size']} is larger than max_batch_size={v['max_batch_size']}: B0 must be <= B_max")
    if v["dtype"] == "float64" and v["amp"] != "off":
        raise ConfigError(f"dtype=float64 with amp={v['amp']} is contradictory: use amp=off with dtype=float64, or dtype=float32 with amp={v['amp']}")
    if not v["seeds"]:
        raise ConfigError("seeds= is empty: give one or more ints, comma-separated (e.g. seeds=0,1,2)")
    if v["baseline"] and v["baseline"] not in cfg.suite.entries and v["baseline"] not in registry.policies:
        raise ConfigError(f"baseline='{v['baseline']}' is no entry of suite {cfg.suite.name}{suggest(v['baseline'], cfg.suite.entries)}")
    if v["dataset"] not in registry.datasets:
        raise ConfigError(f"dataset='{v['dataset']}' is not a registered data source{suggest(v['dataset'], registry.datasets)} (available: {', '.join(sorted(registry.datasets))})")
    if v["model"] not in registry.models:
        raise ConfigError(f"model='{v['model']}' is not a registered model{suggest(v['model'], registry.models)} (available: {', '.join(sorted(registry.models))})")
    if dataset_size is not None:
        if dataset_size < 1:
            raise ConfigError("the training set is empty: raise n_samples= or subset= (0 = the source's default)")
        for k in ("batch_size",):
            if v[k] > dataset_size:
                raise ConfigError(f"{k}={v[k]} is larger than the training set ({dataset_size} samples): choose {k} <= {dataset_size}")
    for e in cfg.entries:
        cls = registry.policies[e.policy][0]
        pcfg = make_policy_config(e, registry)
        ctx = SuiteContext(cfg.suite.name, dataset_size or 0, v["batch_size"], v["max_batch_size"], v["epochs"], v["lr"], 0)
        try:
            pcfg.validate(ctx)
        except ValueError as exc:
            raise ConfigError(f"entry '{e.name}' (policy {cls.name}): {exc}") from None
        except Exception as exc:  # a plugin's validate() with a bug: name it, no traceback
            plugin = registry.policies[e.policy][1]
            raise ConfigError(f"entry '{e.name}': policy {cls.name}'s config validate() (plugin '{plugin}') raised "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                              "(it should raise ValueError naming the bad key)") from None


def show(cfg: RunConfig) -> str:
    """The resolved config with where each value came from (``--show-config``)."""
    lines = [f"# suite {cfg.suite.name}: {cfg.suite.description}"]
    width = max(len(k) for k in cfg.values)
    for k, val in cfg.values.items():
        lines.append(f"{k:<{width}} = {_fmt(val):<24} # {cfg.sources[k]}")
    for e in cfg.entries:
        lines.append(f"[{e.name}] policy = {e.policy}")
        for k, val in e.params.items():
            lines.append(f"  {e.policy}.{k} = {_fmt(val):<20} # {cfg.entry_sources[e.name].get(k, '?')}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(str(x) for x in v) or "(none)"
    return str(v)
