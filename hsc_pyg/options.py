"""Option fields of the configuration dataclasses: a value's type, range and help, written once as :func:`option`;
checked at construction by :func:`check_fields`; turned into command-line flags by :func:`add_arguments`.

Every configuration class of the project (the model's, the data's, training's, evaluation's, search's) is a frozen
dataclass of such fields whose ``__post_init__`` calls :func:`check_fields`, so a value is checked once, wherever it
comes from (a flag, a JSON file, a checkpoint), and every command's flags, defaults and help come from the same place.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import MISSING, field, fields
from typing import Any, Callable, Iterable

from .errors import ConfigError

#: Integers beyond this are refused everywhere (a seed of 10**30 would overflow torch's and numpy's generators).
INT_LIMIT = 2**63
#: What ``--device`` may name; whether that device exists is checked when it is used.
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_KINDS = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}


def option(default: Any, help: str, *, low: float | None = None, below: float | None = None,
           choices: tuple[str, ...] | None = None, repeat: str = "", switch: bool = False, flag: str = "",
           metavar: str | None = None) -> Any:
    """A dataclass field with its help text and valid range: ``low <= value`` (``value < below``), or one of
    ``choices``. Floats must also be finite. A ``tuple[int, ...]`` / ``tuple[str, ...]`` field is given as a repeated
    flag (``repeat="append"``: ``--model A --model B``) or as several values after one (``repeat="nargs"``). A bool
    ``switch`` (default False) is a flag without a value (``--fold5``); other bools take one (``--no_imgnorm true``).
    The flag is ``--<field name>`` unless ``flag`` names it (``models`` is given as ``--model``)."""
    return field(default=default, metadata={"help": help, "low": low, "below": below, "choices": choices,
                                            "repeat": repeat, "switch": switch, "flag": flag,
                                            "metavar": metavar})


def _type_name(annotation: str) -> tuple[str, bool, bool]:
    """``"int | None"`` -> ``("int", True, False)``; ``"tuple[int, ...]"`` -> ``("int", False, True)``."""
    base, _, rest = annotation.partition("|")
    base = base.strip()
    many = base.startswith("tuple[")
    if many:
        base = base[len("tuple["):].partition(",")[0].strip()
    return base, rest.strip() == "None", many


def _describe(kind: str, meta: dict[str, Any], optional: bool) -> str:
    if meta["choices"]:
        valid = f"one of {', '.join(meta['choices'])}"
    else:
        valid = _KINDS[kind]
        if meta["low"] is not None:
            valid += f" >= {meta['low']}"
        if meta["below"] is not None:
            valid += f" and < {meta['below']}"
    return valid + (" (or null: the default)" if optional else "")


def _valid(value: Any, kind: str, meta: dict[str, Any]) -> bool:
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool) and abs(value) < INT_LIMIT,
        "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if ok and kind in ("int", "float"):
        ok = (meta["low"] is None or value >= meta["low"]) and (meta["below"] is None or value < meta["below"])
    return ok and (not meta["choices"] or value in meta["choices"])


def check_value(name: str, value: Any, annotation: str, meta: dict[str, Any]) -> None:
    """ConfigError unless ``value`` has the field's type and lies in its range (each item, for a tuple field)."""
    kind, optional, many = _type_name(annotation)
    if value is None and optional:
        return
    if many:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r} is invalid: expected a list of {_describe(kind, meta, False)}s")
        bad = [v for v in value if not _valid(v, kind, meta)]
        if bad:
            raise ConfigError(f"{name}: {bad[0]!r} is invalid: expected {_describe(kind, meta, False)}")
    elif not _valid(value, kind, meta):
        raise ConfigError(f"{name}={value!r} is invalid: expected {_describe(kind, meta, optional)}")


def check_fields(obj: Any) -> None:
    """:func:`check_value` for every field of the frozen dataclass ``obj``; tuple fields given as lists become
    tuples (so that the object stays hashable and equal to one built from a tuple)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        check_value(f.name, value, str(f.type), f.metadata)
        if isinstance(value, list):
            object.__setattr__(obj, f.name, tuple(value))


def check_device(name: str, value: str) -> None:
    """ConfigError unless ``value`` names a device: auto, cpu or cuda[:N]."""
    if not isinstance(value, str) or DEVICE.fullmatch(value) is None:
        raise ConfigError(f"{name}={value!r} is not a device; use auto, cpu or cuda[:N]")


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, classes: Iterable[type],
                  names: Iterable[str] | None = None) -> None:
    """One ``--name`` flag per field of the dataclasses ``classes`` (or per field in ``names``), all defaulting to
    ``SUPPRESS``, so that :func:`given` tells what the user typed (a preset must not override an explicit flag); the
    help text shows the real default."""
    wanted = None if names is None else set(names)
    for cls in classes:
        for f in fields(cls):
            if wanted is not None and f.name not in wanted:
                continue
            kind, _, many = _type_name(str(f.type))
            meta = f.metadata
            parse = {"bool": _parse_bool, "int": int, "float": float, "str": str}[kind]
            default = f.default if f.default is not MISSING else None
            help = f"{meta['help']} (default: {'none' if many and not default else repr(default)})"
            name = f"--{meta['flag'] or f.name}"
            if meta["switch"]:
                parser.add_argument(name, dest=f.name, action="store_true", default=argparse.SUPPRESS,
                                    help=meta["help"])
                continue
            extra: dict[str, Any] = {}
            if many:
                extra = {"action": "append"} if meta["repeat"] == "append" else {"nargs": "+"}
            parser.add_argument(name, dest=f.name, type=parse, default=argparse.SUPPRESS, **extra,
                                metavar=meta["metavar"] or ("BOOL" if kind == "bool" else f.name.upper()), help=help)


def given(args: argparse.Namespace, classes: Iterable[type]) -> dict[str, Any]:
    """The fields of ``classes`` the user typed on the command line (see :func:`add_arguments`)."""
    return {f.name: getattr(args, f.name) for cls in classes for f in fields(cls) if hasattr(args, f.name)}


def integer(low: int = 0, below: int = INT_LIMIT) -> Callable[[str], int]:
    """An argparse ``type`` for the flags of commands that have no configuration class: an integer with
    ``low <= value < below``, else a one-line usage error before any work."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value < below:
            bound = f" and < {below}" if below < INT_LIMIT else ""
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}{bound}, got {value}")
        return value

    return parse
