"""Experiment configs from YAML and dotted overrides, checked key by key against the dataclasses
of dfkd.config. Unknown keys and values of the wrong type are errors that name the key. YAML is
read with `yaml.safe_load`, which builds plain data and never executes code."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dfkd.errors import DfkdError

if typing.TYPE_CHECKING:
    from dfkd.config import ExperimentConfig


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints widen to floats, nothing else converts."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except DfkdError:
                pass
        raise DfkdError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise DfkdError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise DfkdError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DfkdError(f"{key}: expected a mapping of settings, got {value!r}")
        return _build(tp(), value, prefix=f"{key}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise DfkdError(f"{key}: expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise DfkdError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _build(base: Any, data: dict, prefix: str = "") -> Any:
    """Apply the mapping `data` onto the dataclass instance `base` (its defaults), checking every key."""
    hints = typing.get_type_hints(type(base))
    names = {f.name for f in dataclasses.fields(base)}
    for key, value in data.items():
        if key not in names:
            raise DfkdError(f"unknown config key '{prefix}{key}'; known: {', '.join(sorted(names))}")
        current = getattr(base, key)
        if isinstance(current, dict) and isinstance(value, dict):  # maps merge into their defaults
            setattr(base, key, {**current, **_coerce(value, hints[key], f"{prefix}{key}")})
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise DfkdError(f"{prefix}{key}: expected a mapping of settings, got {value!r}")
            _build(current, value, prefix=f"{prefix}{key}.")
        else:
            setattr(base, key, _coerce(value, hints[key], f"{prefix}{key}"))
    return base


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DfkdError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value); the value is read as a YAML scalar (`3`, `1e-3`, `true`, `null`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise DfkdError(f"bad override {text!r}; write it as section.key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as err:
        raise DfkdError(f"bad override {text!r}: {err.__class__.__name__}") from None
    # "1e-3" is a string to YAML 1.1; users mean a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key, value


def as_override(dotted: str, value: Any) -> str:
    """`key=value` as the command line takes it: generator.conditional=true, method.priors={...}."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return f"{dotted}={text}"


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    data: dict = {}
    if path is not None:
        path = resolve_config(Path(path))
        try:
            data = yaml.safe_load(read_config_text(path))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise DfkdError(f"config file {str(path)!r} is not valid YAML{where}") from None
        if not isinstance(data, dict):
            raise DfkdError(f"config file {str(path)!r} must hold a mapping of sections")
    for text in overrides:
        _set_dotted(data, *parse_override(text))
    return config_from_dict(data)


def _set_keys(data: dict, section: Any, prefix: str = "") -> set[str]:
    """The dotted settings the mapping `data` sets on the dataclass `section`: its leaves, where a
    map (`method.priors`) or list (`teachers`) counts as one setting."""
    keys = set()
    for key, value in data.items():
        current = getattr(section, key, None)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            keys |= _set_keys(value, current, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


def _with_given(config: ExperimentConfig, data: dict) -> ExperimentConfig:
    """`config`, its `given` extended by the settings `data` sets."""
    config.given = sorted((set(config.given) | _set_keys(data, config)) - {"given"})
    for key in config.given:
        if not _is_setting(config, key):
            raise DfkdError(f"given lists {key!r}, which is no setting of the config; drop it from `given`")
    return config.validate()


def _is_setting(section: Any, dotted: str) -> bool:
    """Whether `dotted` names one setting of the dataclass `section` (a section itself is none)."""
    head, _, rest = dotted.partition(".")
    if head not in {f.name for f in dataclasses.fields(section)}:
        return False
    value = getattr(section, head)
    return _is_setting(value, rest) if dataclasses.is_dataclass(value) else not rest


def config_from_dict(data: dict) -> ExperimentConfig:
    """The config `data` describes; every setting in it counts as given."""
    from dfkd.config import ExperimentConfig

    return _with_given(_build(ExperimentConfig(), data), data)


def config_to_dict(config: ExperimentConfig) -> dict:
    return dataclasses.asdict(config)


def with_settings(config: ExperimentConfig, settings: dict[str, Any]) -> ExperimentConfig:
    """A validated copy of `config` with dotted keys set: {"perf.compile": True}; they join what
    it was given."""
    from dfkd.config import ExperimentConfig

    data, changed = config_to_dict(config), {}
    for dotted, value in settings.items():
        _set_dotted(data, dotted, value)
        _set_dotted(changed, dotted, value)
    return _with_given(_build(ExperimentConfig(), data), changed)


# --- experiment files ------------------------------------------------------------------------------


def experiments_dir() -> Path | None:
    """The shipped experiment files: dfkd/experiments in an installed package, runs/ in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "experiments", here.parent / "runs"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    return None


def shipped_experiments() -> dict[str, Path]:
    folder = experiments_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder else {}


def find_experiment(name: str | Path) -> Path | None:
    """The shipped experiment file `name` names: mnist5k_demo, mnist5k_demo.yaml or runs/mnist5k_demo.yaml."""
    path = Path(name)
    return shipped_experiments().get(path.stem if path.suffix in (".yaml", ".yml") else path.name)


def resolve_config(path: Path | None) -> Path | None:
    """An existing path as it is; otherwise a shipped experiment of that name (with or without .yaml)."""
    if path is None or path.exists():
        return path
    shipped = find_experiment(path)
    if shipped is None:
        raise DfkdError(
            f"config file {str(path)!r} not found; give a YAML path or a shipped experiment name "
            "(`dfkd list` shows them)"
        )
    return shipped


def first_comment(path: Path) -> str:
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def read_config_text(path: Path) -> str:
    """The text of a config file; a folder, unreadable bytes, non-UTF-8 or no settings are errors."""
    if path.is_dir():
        raise DfkdError(f"config file {str(path)!r} is a directory; name a YAML file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DfkdError(f"cannot read config file {str(path)!r}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DfkdError(
            f"config file {str(path)!r} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
            f"{err.start}); save it as UTF-8"
        ) from None
    try:
        empty = yaml.safe_load(text) is None
    except yaml.YAMLError:
        return text  # load_config reports where
    if empty:
        raise DfkdError(
            f"config file {str(path)!r} is empty; write settings in it (at least `name: ...`) or "
            "start from a shipped experiment (`dfkd list`)"
        )
    return text
