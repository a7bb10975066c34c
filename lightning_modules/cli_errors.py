"""One short line for a mistake on the command line or in a config (train.py and evaluate.py).

jsonargparse reports a typo such as ``--model.init_args.alpah 1`` as 50-66 lines: the whole usage, then a nested
"Does not validate against any of the Union subtypes" tree. :class:`ShortErrorParser` prints instead the one line
that matters, ``<prog>: error: <what> (did you mean ...?)``, and exits with status 2 (argparse's status).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from typing import NoReturn

from jsonargparse import ArgumentParser


def import_class(class_path: str | None):
    """The class named by a config's ``class_path``, or None if it cannot be imported."""
    if not class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def init_parameters(cls) -> list[str]:
    """Keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up the base classes as jsonargparse does."""
    names: list[str] = []
    for klass in inspect.getmro(cls) if inspect.isclass(cls) else ():
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [
            p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def did_you_mean(word: str, candidates: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _option_strings(parser) -> list[str]:
    """Every ``--option`` of ``parser`` and of its subcommands' parsers."""
    out = []
    for action in parser._actions:
        out += [s for s in action.option_strings if s.startswith("--")]
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict):
            out += [o for sub in choices.values() if hasattr(sub, "_actions") for o in _option_strings(sub)]
    return out


def short_message(message: str, parser=None) -> str:
    """The one line that matters in a jsonargparse error ``message`` (``parser`` proposes close options)."""
    lines = [line.strip().removeprefix("- ") for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "invalid arguments"
    text = "\n".join(lines)
    keys = re.findall(r'Parser key "([^"]+)"', text)
    given = re.findall(r"NestedArg\(key='([^']*)', val='([^']*)'\)", text)
    # The option as typed: the outermost key plus the command line's nested key, when there is one.
    option = f"--{keys[0]}" if keys else ""
    if keys and given:
        option = f"--{keys[0]}.init_args.{given[-1][0]}"
    elif len(keys) > 1:
        option = f"--{keys[0]}.init_args." + ".".join(keys[1:])
    unknown = re.findall(r"Option '([^']+)' is not accepted", text)
    if unknown:
        owners = re.findall(r"given class_path '([^']+)'", text)
        owners += re.findall(r"class_path='([^']+)', init_args=Namespace\(" + re.escape(unknown[-1]), text)
        owner = owners[-1] if owners else None
        hint = did_you_mean(unknown[-1], init_parameters(import_class(owner)))
        where = option if given else f"{option} {unknown[-1]!r}".strip()
        return f"{where}: no such option of {owner}{hint}" if owner else f"{where}: no such option{hint}"
    expected = [line for line in lines if line.startswith("Expected a ") and "NoneType" not in line]
    if expected:
        what = re.sub(r"<class '([^']+)'>", r"\1", expected[-1])
        return f"{option}: {what[0].lower()}{what[1:]}"
    for line in (lines[0], lines[-1]):
        unrecognized = re.match(r"unrecognized arguments: (.*)", line)
        options = [a for a in unrecognized.group(1).split() if a.startswith("--")] if unrecognized else []
        if options:
            word = options[0].split("=", 1)[0]
            hint = did_you_mean(word, _option_strings(parser)) if parser is not None else ""
            return f"unknown option {word}{hint}"
    head = re.match(r'Parser key "([^"]+)": (.+)', lines[0])
    if head and len(lines) == 1:
        return f"--{head.group(1)}: {head.group(2)}"
    # Deepest line of a nested report, else the first one.
    skip = ("Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>", "Does not validate")
    detail = [line for line in lines[1:] if not line.startswith(skip)]
    return f"{lines[0].rstrip(':')}: {detail[-1]}" if detail else lines[0]


class ShortErrorParser(ArgumentParser):
    """A jsonargparse parser whose errors are one line, ``<prog>: error: ...`` on stderr, status 2.

    With ``exit_on_error=False`` (Lightning's and jsonargparse's own nested parses) it raises as before.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        failing = getattr(ex, "subcommand_parser", None) or self
        words = (failing.prog or sys.argv[0]).replace(" [options]", "").split()
        line = " ".join(short_message(message, failing).split())
        sys.stderr.write(f"{words[0]}: error: {line} (see: {' '.join(words)} --help)\n")
        raise SystemExit(2)
