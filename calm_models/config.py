"""Nested-dataclass configuration: build, check, merge, override, save and compare.

A run is described by one nested ``@dataclass`` (for example ``TrainConfig`` holding a
``model``, ``data``, ``optim`` ... section).  This module is generic: it knows nothing about
the models and works with any dataclass tree.  Values are resolved with the precedence

    dataclass defaults  <  preset  <  config file (YAML/TOML)  <  dotted command-line overrides

and the result is type-checked field by field (with light coercion: ``int`` is accepted for
``float``, the string ``"1e-3"`` for a float, ``"true"`` for a bool, a list for a tuple), then
every nested dataclass that defines ``validate()`` is asked to check itself.  All errors are
:class:`ConfigError` (a ``ValueError``) with a one-line message that names the dotted path of the
offending field, e.g. ``optim.lr: expected a float, got str 'fast'`` or
``unknown field 'optim.lrr' (did you mean 'lr'?); valid fields of OptimConfig: lr, ...``.

Example:
    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class Optim:
    ...     lr: float = 3e-4
    ...     betas: tuple[float, float] = (0.9, 0.95)
    >>> @dataclass
    ... class Run:
    ...     name: str = "run"
    ...     optim: Optim = field(default_factory=Optim)
    >>> cfg = resolve_config(Run, preset=None, file=None, overrides=["optim.lr=1e-3"])
    >>> cfg.optim.lr
    0.001
    >>> config_to_dict(cfg)
    {'name': 'run', 'optim': {'lr': 0.001, 'betas': [0.9, 0.95]}}
    >>> diff_configs(cfg, Run())
    ['optim.lr']
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import functools
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "diff_configs",
    "flatten_config",
    "load_config_file",
    "resolve_config",
    "save_config",
    "validate_config",
]

T = TypeVar("T")

_TRUE_STRINGS = {"true", "yes", "on", "1", "y"}
_FALSE_STRINGS = {"false", "no", "off", "0", "n"}
_CONFIG_SUFFIXES = (".yaml", ".yml", ".toml")


class ConfigError(ValueError):
    """A configuration value, key, file or override is invalid.

    The message is a single line naming the dotted path of the field concerned, suitable for a
    command-line tool to print as ``error: <message>``.
    """


# ----------------------------------------------------------------------------------------------
# Type helpers
# ----------------------------------------------------------------------------------------------


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (string annotations evaluated)."""
    try:
        return typing.get_type_hints(cls)
    except NameError:
        pass
    # A class defined inside a function (a test, a doctest) can name nested config classes that
    # are not module globals: resolve those names from the fields' defaults.
    local: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        for candidate in (f.default_factory, type(f.default)):
            if isinstance(candidate, type):
                local.setdefault(candidate.__name__, candidate)
    try:
        return typing.get_type_hints(cls, localns=local)
    except Exception as exc:  # noqa: BLE001 - turn any resolution failure into a clear error
        raise ConfigError(f"cannot resolve the field types of {cls.__name__}: {exc}") from None


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_union(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "")


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _suggest(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_field_error(cls: type, key: str, path: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    return ConfigError(
        f"unknown field {_join(path, key)!r}{_suggest(str(key), names)}; "
        f"valid fields of {cls.__name__}: {', '.join(names)}"
    )


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (with light coercion) and return it."""
    label = path or "<root>"
    if tp is Any or tp is object:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{label}: expected None, got {_show(value)}")
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{label}: expected {_type_name(tp)}, got None")
        candidates = [a for a in args if a is not type(None)]
        # An exact match wins (so `int | str` keeps 5 as an int and "5" as a str).
        for arg in candidates:
            if isinstance(arg, type) and typing.get_origin(arg) is None and type(value) is arg:
                return value
        for arg in candidates:
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(f"{label}: expected {_type_name(tp)}, got {_show(value)}")
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if any(type(value) is type(a) and value == a for a in allowed):
            return value
        for option in allowed:  # "1" from the command line for Literal[1, 2]
            if isinstance(value, str) and not isinstance(option, str) and str(option) == value:
                return option
        raise ConfigError(
            f"{label}: expected one of {', '.join(repr(a) for a in allowed)}, got {_show(value)}"
        )
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return config_from_dict(tp, value, path=path)
        raise ConfigError(f"{label}: expected a mapping for {tp.__name__}, got {_show(value)}")
    if origin in (list, Sequence) or tp in (list, Sequence):
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):  # a single item given where a list is expected
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{label}: expected a list, got {_show(value)}")
        return [_coerce(v, item_tp, f"{label}[{i}]") for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"{label}: expected a list of {len(args) or 'any'} items, got {_show(value)}"
            )
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{label}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{label}: expected {len(args)} items, got {len(value)}: {value!r}")
        return tuple(
            _coerce(v, a, f"{label}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        args = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{label}: expected a mapping, got {_show(value)}")
        return {
            _coerce(k, args[0], label): _coerce(v, args[1], _join(path, k))
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS | _FALSE_STRINGS:
            return value.strip().lower() in _TRUE_STRINGS
        raise ConfigError(f"{label}: expected a bool (true/false), got {_show(value)}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{label}: expected an int, got {_show(value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    value = float(value)
                except ValueError:
                    raise ConfigError(f"{label}: expected an int, got {_show(value)}") from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{label}: expected an int, got {_show(value)}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{label}: expected a float, got {_show(value)}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{label}: expected a float, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `name: 2024` in YAML means the text "2024"
        raise ConfigError(f"{label}: expected a str, got {_show(value)}")
    if isinstance(tp, type) and issubclass(tp, Path):
        if isinstance(value, (str, os.PathLike)):
            return tp(value)
        raise ConfigError(f"{label}: expected a path, got {_show(value)}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except ValueError:
            if isinstance(value, str) and value in tp.__members__:
                return tp[value]
        valid = ", ".join(repr(m.value) for m in tp)
        raise ConfigError(f"{label}: expected one of {valid}, got {_show(value)}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{label}: expected {_type_name(tp)}, got {_show(value)}")
    return value  # unsupported annotation (e.g. a Callable): accept as is


# ----------------------------------------------------------------------------------------------
# dict <-> dataclass
# ----------------------------------------------------------------------------------------------


def config_from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "") -> T:
    """Build the dataclass ``cls`` (recursively) from a plain mapping, checking every value.

    Missing keys take the field's default; nested dataclass fields accept a mapping (or an
    instance).  Values are checked against the annotations (``int``, ``float``, ``bool``,
    ``str``, ``Path``, ``Optional[...]``/``X | None``, ``Literal[...]``, ``list[...]``,
    ``tuple[...]``, ``dict[...]``, ``Enum`` and nested dataclasses) with light coercion:
    an ``int`` is accepted for a ``float``, numeric strings such as ``"1e-3"`` are parsed,
    ``"true"``/``"false"`` are accepted for a bool, a list for a tuple and a single string for a
    list of strings.

    Args:
        cls: The dataclass type to build.
        data: Mapping of field name to value (for example parsed YAML).
        path: Dotted prefix used in error messages (the location of ``data`` in a larger
            config); ``""`` for the root.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: If ``data`` is not a mapping, holds an unknown key (the message names the
            dotted path, suggests the closest field and lists the valid ones), misses a field
            without default, or holds a value of the wrong type.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Optim:
        ...     lr: float = 3e-4
        ...     warmup_steps: int = 100
        >>> config_from_dict(Optim, {"lr": "1e-3", "warmup_steps": 10})
        Optim(lr=0.001, warmup_steps=10)
        >>> config_from_dict(Optim, {"lrr": 1.0}, path="optim")
        Traceback (most recent call last):
        ...
        calm_models.config.ConfigError: unknown field 'optim.lrr' (did you mean 'lr'?); valid fields of Optim: lr, warmup_steps
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"cls must be a dataclass type, got {cls!r}")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{path or '<root>'}: expected a mapping for {cls.__name__}, got {_show(data)}"
        )
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields or not fields[key].init:
            raise _unknown_field_error(cls, str(key), path)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if not f.init:
            continue
        sub = _join(path, name)
        if name in data:
            kwargs[name] = _coerce(data[name], hints.get(name, Any), sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required field {sub!r} of {cls.__name__}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # e.g. a __post_init__ check
        raise ConfigError(f"{path or cls.__name__}: {exc}") from None


def config_to_dict(cfg: Any) -> Any:
    """Convert a config (dataclass tree) into plain JSON/YAML-friendly Python values.

    Like :func:`dataclasses.asdict` but tuples become lists, ``Path`` becomes ``str`` and
    enums become their value, so ``yaml.safe_dump`` and ``json.dumps`` accept the result and
    :func:`config_from_dict` turns it back into an equal config.

    Args:
        cfg: A dataclass instance (or a mapping/list/scalar, converted recursively).

    Returns:
        Nested ``dict``/``list``/scalars.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Optim:
        ...     betas: tuple[float, float] = (0.9, 0.95)
        >>> config_to_dict(Optim())
        {'betas': [0.9, 0.95]}
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, enum.Enum):
        return config_to_dict(cfg.value)
    if isinstance(cfg, os.PathLike):
        return os.fspath(cfg)
    return copy.deepcopy(cfg)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) config file into a dict.

    Args:
        path: File to read.  An empty YAML file gives ``{}``.

    Returns:
        The parsed mapping (not yet checked against any dataclass).

    Raises:
        ConfigError: One line naming the file when it does not exist, has an unsupported
            suffix, cannot be parsed (with the line number when the parser gives one) or does
            not hold a mapping at the top level.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "run.toml"
        >>> _ = p.write_text('[optim]\\nlr = 1e-3\\n')
        >>> load_config_file(p)
        {'optim': {'lr': 0.001}}
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in _CONFIG_SUFFIXES:
        raise ConfigError(
            f"unsupported config file type {suffix!r} for {path}; use one of {', '.join(_CONFIG_SUFFIXES)}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"cannot parse {path}: {exc}") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"cannot parse {path}{where}: {problem}") from None
        if data is None:
            data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def save_config(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Write a config (dataclass or dict) to ``path`` as YAML, atomically.

    The file is written to a temporary name next to ``path`` and renamed over it, so a crash
    never leaves a half-written config.  ``config_from_dict(cls, load_config_file(path))``
    gives back a config equal to ``cfg``.

    Args:
        cfg: Dataclass instance or plain mapping.
        path: Destination (``.yaml``/``.yml`` recommended).

    Returns:
        The path written.

    Example:
        >>> import tempfile, pathlib
        >>> p = save_config({"optim": {"lr": 0.001}}, pathlib.Path(tempfile.mkdtemp()) / "c.yaml")
        >>> print(p.read_text(), end="")
        optim:
          lr: 0.001
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# Overrides and resolution
# ----------------------------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> Any:
    """``X | None`` -> ``X`` when exactly one non-None member remains."""
    if _is_union(tp):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _accepts_plain_string(tp: Any) -> bool:
    """True when the raw command-line text should be kept as a string (str / Path fields)."""
    tp = _unwrap_optional(tp)
    if tp is str or (isinstance(tp, type) and issubclass(tp, Path)):
        return True
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return False


def _parse_override_value(raw: str, tp: Any, key: str) -> Any:
    text = raw.strip()
    if _accepts_plain_string(tp):
        if (
            text.lower() in ("null", "none", "~")
            and _is_union(tp)
            and type(None) in typing.get_args(tp)
        ):
            return None
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return text[1:-1]
        return text
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"cannot parse the value of override {key}={raw}: {problem}") from None


def _schema_lookup(cls: type, keys: list[str], full_key: str) -> Any:
    """Return the annotation at the dotted ``keys`` inside dataclass ``cls``."""
    tp: Any = cls
    walked: list[str] = []
    for key in keys:
        inner = _unwrap_optional(tp)
        if _is_dataclass_type(inner):
            names = {f.name for f in dataclasses.fields(inner) if f.init}
            if key not in names:
                raise _unknown_field_error(inner, key, ".".join(walked))
            tp = _type_hints(inner)[key]
        elif typing.get_origin(inner) in (dict, Mapping) or inner in (dict, Mapping):
            args = typing.get_args(inner) or (Any, Any)
            tp = args[1]
        elif inner is Any:
            tp = Any
        else:
            raise ConfigError(
                f"override {full_key!r}: {'.'.join(walked) or '<root>'} is of type "
                f"{_type_name(inner)}, not a section with sub-fields"
            )
        walked.append(key)
    return tp


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str], cls: type) -> dict[str, Any]:
    """Apply dotted ``key.sub=value`` overrides to a config mapping, checked against ``cls``.

    The value is parsed as a YAML scalar or flow list/mapping (``optim.lr=3e-4``,
    ``run.compile=true``, ``data.train_files=[a.jsonl,b.jsonl]``), except for string and path
    fields whose raw text is kept (so ``run.name=123`` stays the string ``"123"``).  Each value
    is type-checked immediately so that the error names the override.

    Args:
        data: Current config mapping (not modified).
        overrides: ``"dotted.key=value"`` strings, applied in order.
        cls: The root dataclass type describing the schema.

    Returns:
        A new nested dict with the overrides applied.

    Raises:
        ConfigError: For an override without ``=``, an unknown dotted path (with suggestion and
            the valid fields), an unparsable or mistyped value.

    Example:
        >>> from dataclasses import dataclass, field
        >>> @dataclass
        ... class Data:
        ...     train_files: list[str] = field(default_factory=list)
        >>> @dataclass
        ... class Run:
        ...     compile: bool = False
        ...     data: Data = field(default_factory=Data)
        >>> apply_overrides({}, ["compile=true", "data.train_files=[a.jsonl,b.jsonl]"], Run)
        {'compile': True, 'data': {'train_files': ['a.jsonl', 'b.jsonl']}}
    """
    result: dict[str, Any] = copy.deepcopy(dict(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        keys = key.split(".")
        if not key or any(not k for k in keys):
            raise ConfigError(f"override {item!r} has an empty key")
        tp = _schema_lookup(cls, keys, key)
        value = _coerce(_parse_override_value(raw, tp, key), tp, key)
        node = result
        for k in keys[:-1]:
            child = node.get(k)
            if dataclasses.is_dataclass(child) and not isinstance(child, type):
                child = config_to_dict(child)
            if not isinstance(child, dict):
                child = {}
            node[k] = child
            node = child
        node[keys[-1]] = config_to_dict(value)
    return result


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _iter_dataclasses(obj: Any, path: str):
    """Yield ``(path, instance)`` for every dataclass instance in a config tree (pre-order)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        yield path, obj
        for f in dataclasses.fields(obj):
            yield from _iter_dataclasses(getattr(obj, f.name), _join(path, f.name))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _iter_dataclasses(v, f"{path}[{i}]")
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _iter_dataclasses(v, _join(path, k))


def validate_config(cfg: Any) -> None:
    """Call ``validate()`` on every dataclass of the tree that defines it; report all problems.

    A ``validate()`` method may raise ``ValueError``/``TypeError`` (its message is collected) or
    return an iterable of problem strings (empty when fine).  It should check only its own
    fields: nested sections are visited separately.

    Args:
        cfg: Root dataclass instance.

    Raises:
        ConfigError: ``invalid configuration: <path>: <problem>; ...`` listing every problem.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Optim:
        ...     lr: float = 3e-4
        ...     def validate(self):
        ...         if self.lr <= 0:
        ...             raise ValueError(f"lr must be > 0, got {self.lr}")
        >>> validate_config(Optim(lr=-1.0))
        Traceback (most recent call last):
        ...
        calm_models.config.ConfigError: invalid configuration: lr must be > 0, got -1.0
    """
    problems: list[str] = []
    for path, obj in _iter_dataclasses(cfg, ""):
        method = getattr(obj, "validate", None)
        if not callable(method):
            continue
        prefix = f"{path}: " if path else ""
        try:
            result = method()
        except (ValueError, TypeError) as exc:
            problems.append(prefix + " ".join(str(exc).split()))
            continue
        if isinstance(result, (list, tuple, set)):  # a validate() may also return self
            problems.extend(prefix + " ".join(str(p).split()) for p in result)
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))


def resolve_config(
    cls: type[T],
    *,
    preset: Mapping[str, Any] | T | None = None,
    file: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Resolve a run configuration: defaults < preset < file < overrides, then validate.

    Args:
        cls: Root dataclass type.
        preset: A config instance of ``cls`` or a (partial) mapping, e.g. the result of a named
            preset function; ``None`` for the dataclass defaults.
        file: Optional YAML/TOML file; its (partial) mapping is deep-merged over the preset.
        overrides: Dotted ``key=value`` strings applied last (see :func:`apply_overrides`).

    Returns:
        The checked and validated ``cls`` instance.

    Raises:
        ConfigError: For any file, key, type or validation problem (one line, dotted path).

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Optim:
        ...     lr: float = 3e-4
        ...     warmup_steps: int = 100
        >>> resolve_config(Optim, preset={"lr": 1e-3, "warmup_steps": 5}, overrides=["warmup_steps=7"])
        Optim(lr=0.001, warmup_steps=7)
    """
    data: dict[str, Any] = {}
    if preset is not None:
        if dataclasses.is_dataclass(preset) and not isinstance(preset, type):
            if not isinstance(preset, cls):
                raise ConfigError(
                    f"preset is a {type(preset).__name__}, expected a {cls.__name__} or a mapping"
                )
            data = config_to_dict(preset)
        elif isinstance(preset, Mapping):
            data = config_to_dict(preset)
        else:
            raise ConfigError(f"preset must be a {cls.__name__} or a mapping, got {_show(preset)}")
    if file is not None:
        data = _deep_merge(data, load_config_file(file))
    if overrides:
        data = apply_overrides(data, list(overrides), cls)
    cfg = config_from_dict(cls, data)
    validate_config(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------


def flatten_config(cfg: Any) -> dict[str, Any]:
    """Flatten a config (dataclass or mapping) into ``{"dotted.path": leaf_value}``.

    Lists and tuples are leaves (tuples become lists); an empty mapping is a leaf ``{}``.

    Args:
        cfg: Dataclass instance or nested mapping.

    Returns:
        Flat dict of dotted path to plain value.

    Example:
        >>> flatten_config({"model": {"hidden": 8, "betas": (0.9, 0.95)}, "seed": 0})
        {'model.hidden': 8, 'model.betas': [0.9, 0.95], 'seed': 0}
    """
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and node:
            for k, v in node.items():
                walk(v, _join(prefix, k))
        else:
            out[prefix] = node

    walk(config_to_dict(cfg), "")
    return out


def diff_configs(a: Any, b: Any, fields: Sequence[str] | None = None) -> list[str]:
    """Dotted paths whose values differ between two configs (dataclasses or mappings).

    A path present in only one of them counts as different.  Tuples and lists compare equal
    when their items do (a YAML round trip turns tuples into lists).

    Args:
        a: First config.
        b: Second config.
        fields: Optional dotted prefixes restricting the comparison (``["model"]`` compares
            ``model`` and everything below it); ``None`` compares everything.

    Returns:
        Sorted list of differing dotted paths.

    Example:
        >>> diff_configs({"model": {"h": 8, "l": 2}, "lr": 1}, {"model": {"h": 16, "l": 2}, "lr": 2},
        ...              fields=["model"])
        ['model.h']
    """
    fa, fb = flatten_config(a), flatten_config(b)

    def selected(path: str) -> bool:
        if fields is None:
            return True
        return any(
            path == f or path.startswith(f + ".") or f.startswith(path + ".") for f in fields
        )

    _missing = object()
    diffs = []
    for path in sorted(set(fa) | set(fb)):
        if selected(path) and fa.get(path, _missing) != fb.get(path, _missing):
            diffs.append(path)
    return diffs
