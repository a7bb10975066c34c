"""A command line generated from functions: each command is a function whose signature and Google-style docstring
declare its options once (name, type, default, help), next to the code that uses them.

Why not jsonargparse's ``CLI`` (the project's config system): the toy world's commands predate this module, and
docs, scripts and tests call them with dashed options (``--n-train``), repeated ``--config`` files merged in
order, space-separated lists (``--layers 1 2 3``) and one ``python -m toyworld: error: ...`` line for a bad value;
``CLI`` spells options with underscores, owns ``--config`` and reads a list as one YAML value. The rules here are
small: a parameter without a default is positional; ``bool`` is a flag; ``Literal`` gives choices; ``list[T]``
takes several values after one option; ``Repeated`` (a ``list[str]``) is an option given once per value;
``Required`` is an option that must be given. A
command refuses a bad value by raising :class:`UsageError`.
"""

from __future__ import annotations

import argparse
import inspect
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

Repeated = Annotated[list[str], "repeated"]  # --config a.yaml --config b.yaml -> ["a.yaml", "b.yaml"]
Required = Annotated[str, "option"]  # a required --option, not a positional argument


class UsageError(ValueError):
    """A bad command-line value: printed as one ``<prog>: error: <message>`` line, exit status 2."""


def _docstring(fn: Callable) -> tuple[str, dict[str, str]]:
    """The summary (text before ``Args:``) and each argument's help from a Google-style docstring."""
    doc = inspect.cleandoc(fn.__doc__ or "")
    summary, _, rest = doc.partition("\nArgs:\n")
    helps: dict[str, str] = {}
    name = None
    for line in rest.splitlines():
        if line and not line.startswith(" "):  # the next section (Returns:, ...)
            break
        match = re.match(r"^ {4}(\w+)(?: \(.*?\))?: ?(.*)$", line)
        if match:
            name, helps[match.group(1)] = match.group(1), match.group(2)
        elif name and line.strip():
            helps[name] += " " + line.strip()
    return summary.strip(), helps


def _add_parameter(parser: argparse.ArgumentParser, p: inspect.Parameter, hint: Any, help_text: str) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":  # X | None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    kwargs: dict[str, Any] = {"help": help_text.replace("%", "%%")}
    option = origin is Annotated and "option" in args[1:]
    if option:
        hint, origin = args[0], None
    if origin is Annotated and "repeated" in args[1:]:
        kwargs |= {"action": "append", "metavar": p.name.upper()}
    elif origin is list:
        kwargs |= {"nargs": "*", "type": args[0]}
    elif origin is Literal:
        kwargs |= {"choices": list(args), "type": type(args[0])}
    elif hint is bool:
        kwargs["action"] = "store_true"
    else:
        kwargs["type"] = hint
    if p.default is inspect.Parameter.empty:
        if option or kwargs.get("action") == "append":
            parser.add_argument(f"--{p.name.replace('_', '-')}", dest=p.name, required=True, **kwargs)
        else:
            parser.add_argument(p.name, **kwargs)
        return
    if kwargs.get("action") != "store_true":
        kwargs["default"] = p.default
        if p.default is not None and kwargs.get("action") != "append":
            kwargs["help"] += f" (default: {p.default})"
    parser.add_argument(f"--{p.name.replace('_', '-')}", dest=p.name, **kwargs)


def check(condition: bool, message: str) -> None:
    """Raises :class:`UsageError` with ``message`` unless ``condition``."""
    if not condition:
        raise UsageError(message)


def check_configs(configs: list[str]) -> None:
    """Every ``--config`` file exists."""
    for config in configs:
        check(Path(config).is_file(), f"--config {config} does not exist")


def check_checkpoint(path: str | Path, missing_ok: bool = False) -> None:
    """Refuses (:class:`UsageError`) a checkpoint that does not read weights-only, before any work; ``missing_ok``:
    a missing file is no error (nothing to resume from)."""
    from models.weights_only import check_weights_only

    def refuse(message: str) -> None:
        raise UsageError(message)

    check_weights_only(path, refuse, missing_ok=missing_ok)


def load_checked_config(configs: list[str]) -> dict:
    """The merged ``--config`` files (each must exist), after refusing an unsafe ``<out_dir>/last.pt``."""
    check_configs(configs)
    from toyworld.training.train import load_config

    cfg = load_config(configs)
    check_checkpoint(Path(cfg.get("out_dir", "")) / "last.pt", missing_ok=True)
    return cfg


def add_command(subparsers, name: str, fn: Callable) -> argparse.ArgumentParser:
    """Adds ``name`` running ``fn``; its options come from ``fn``'s signature and docstring."""
    summary, helps = _docstring(fn)
    parser = subparsers.add_parser(  # no help=: the listing by room in the main --help replaces argparse's
        name,
        description=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(fn, include_extras=True)
    for p in inspect.signature(fn).parameters.values():
        if p.name not in helps:
            raise TypeError(f"{fn.__module__}.{fn.__qualname__}: document argument {p.name!r} under Args:")
        _add_parameter(parser, p, hints[p.name], helps[p.name])
    parser.set_defaults(_command=fn)
    return parser


def build_parser(
    prog: str, description: str, rooms: dict[str, dict[str, Callable]]
) -> argparse.ArgumentParser:
    """A parser with one subcommand per function, listed under its room in ``--help``."""
    listing = []
    for room, commands in rooms.items():
        listing.append(f"\n{room}:")
        for name, fn in commands.items():
            listing.append(f"  {name:<26} {_docstring(fn)[0].split(chr(10) * 2)[0].replace(chr(10), ' ')}")
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description + "\ncommands by room:" + "\n".join(listing),
        epilog=f"{prog} <command> --help: the command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>", help="one of the above")
    for commands in rooms.values():
        for name, fn in commands.items():
            add_command(sub, name, fn)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> Any:
    """Parses ``argv`` and calls the chosen command; a :class:`UsageError` exits with one error line (status 2)."""
    args = vars(parser.parse_args(argv))
    fn = args.pop("_command")
    args.pop("command", None)
    try:
        return fn(**args)
    except UsageError as err:
        parser.error(str(err))
