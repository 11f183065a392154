"""Configs are dataclasses with a one-line doc per field, loaded from YAML with CLI overrides.

Every entry point takes ``[CONFIG.yaml] [--key value ...]``. A nested dataclass field is
reached with a dotted key (``--optim.lr 3e-4``). Values are parsed as YAML scalars/lists, so
``--k 5``, ``--domains [radiology,pathology]`` and ``--bf16 true`` all work. Unknown keys and
values of the wrong type are refused before any work starts (exit code 2), naming the file.

Declare a field with its doc beside it::

    @dataclass
    class TrainConfig:
        lr: float = doc(1e-4, "peak learning rate")
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false are bools, so ``mixed_precision: no``
    stays the string "no" (accelerate's spelling) instead of becoming false."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _first in "tTfF":
    _Loader.yaml_implicit_resolvers.setdefault(_first, []).append(
        ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"))
    )
_WORD_BOOLS = {"yes": True, "on": True, "no": False, "off": False}


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass


class ConfigError(ValueError):
    """A config problem the user must fix; entry points turn it into exit code 2."""


def doc(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line help text (shown by ``--help``)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda d=default: d, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Coerce ``value`` to annotation ``tp`` where lossless (int->float, str->Path), else raise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _check_type(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            keys = ", ".join(f.name for f in dataclasses.fields(tp))
            raise ConfigError(f"{where}: a section: expected a mapping of its keys ({keys}), got {value!r}")
        return _from_dict(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    if tp is bool and isinstance(value, str) and value.lower() in _WORD_BOOLS:
        return _WORD_BOOLS[value.lower()]
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool) and tp is not bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        # a partial mapping for a nested section overrides the section's default, field by field
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict):
            if f.default_factory is not dataclasses.MISSING:
                value = _merge(to_dict(f.default_factory()), value)
        kwargs[f.name] = _check_type(value, hints[f.name], f"{where}.{f.name}" if where else f.name)
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config (paths as strings)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        data = data.setdefault(p, {})
        if not isinstance(data, dict):
            raise ConfigError(f"--{key}: {p} is not a section")
    data[parts[-1]] = value


def help_text(cls: type, prefix: str = "") -> str:
    """One line per field: ``--name (type, default) help``."""
    lines = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(help_text(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required"
        )
        tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        lines.append(f"  --{prefix}{f.name} ({tname}, default {default!r})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def load_config(cls: type[T], argv: list[str] | None = None, description: str = "") -> T:
    """Parse ``[CONFIG.yaml] [--key value ...]`` into ``cls``; later sources override earlier.

    Raises ConfigError with the file name (or the flag) on any problem.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(f"{description}\n\nusage: [CONFIG.yaml] [--key value ...]\n\noptions:\n{help_text(cls)}")
        raise SystemExit(0)
    data: dict[str, Any] = {}
    source = "command line"
    if argv and not argv[0].startswith("--"):
        path = Path(argv.pop(0))
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file does not exist")
        try:
            loaded = _yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        data = loaded
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --key value")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                val = "true"  # a bare flag: --merge
            else:
                i += 1
                val = argv[i]
        try:
            parsed = _yaml(val) if val != "" else ""
        except yaml.YAMLError:
            parsed = val
        _set_dotted(data, key.replace("-", "_"), parsed)
        i += 1
    try:
        return _from_dict(cls, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (``run_config.yaml``), atomically."""
    from common.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def cli_main(fn: typing.Callable[[], Any]) -> None:
    """Run an entry point; user errors (ConfigError, InputError) exit 2 with the message, a run
    stopped on purpose (RunStopped, e.g. diverged) and an output that cannot be written
    (read-only, full disk, no permission) exit 1 with one line. A process group is closed
    before the interpreter exits: left to teardown, gloo's threads can abort a rank."""
    import errno

    from common.io import InputError, RunStopped

    try:
        fn()
    except (ConfigError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EDQUOT):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}cannot write: {e.strerror or e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        close_process_group()


def close_process_group() -> None:
    """Destroy torch.distributed's default group if this process has one (a no-op otherwise,
    without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
