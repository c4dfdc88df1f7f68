"""Command-line runs end on one clear line: the project's message, naming the file and the problem.

MONAI's bundle runner evaluates the configs' expressions and wraps any exception in
``RuntimeError: Failed to evaluate ConfigExpression``, so the message that names the bad file sat in
the middle of a long traceback. The configs import this module (``"$import scripts.cli"``); when
the process is the bundle command line (``python -m monai.bundle``, also under torchrun) that
installs an exception hook which prints ``ERROR: <message>`` instead of the traceback for bad input
(the project's errors, ``ValueError``, ``OSError``). Programming errors keep their traceback, and
``CRYOSXT_DEBUG=1`` shows it for everything. Importing the configs elsewhere (tests, the MONAI Label
server) changes nothing.

:func:`run_main` does the same for the command lines of modules (``python -m scripts.X``) and of
the simulator (``python -m cryosxt_sim``), and refuses unknown flags before any work: ``fire`` would
run the function first and complain after.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["DEBUG_ENV", "check_flags", "install", "run_main", "user_error"]

DEBUG_ENV = "CRYOSXT_DEBUG"
_PACKAGE = Path(__file__).resolve().parent
_BUNDLE_MAIN = ("monai.bundle.__main__", "monai.bundle")


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _raised_here(exc: BaseException) -> bool:
    """True when ``exc`` was raised by the project's own code (its last frame is in this package or
    one of its sub-packages)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return _PACKAGE in Path(tb.tb_frame.f_code.co_filename).resolve().parents


def user_error(exc: BaseException) -> BaseException | None:
    """The outermost exception in ``exc``'s chain of causes that reports bad input, or None for a bug."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ValueError, OSError)) or (
            isinstance(current, (RuntimeError, LookupError)) and _raised_here(current)
        ):
            return current
        current = current.__cause__
    return None


def message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # A DataLoader worker's error arrives with the worker's traceback in its message: keep its last line.
    if "Original Traceback" in text:
        text = text.splitlines()[-1]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())  # one line


def _hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    found = user_error(exc)
    if found is None or _debug():
        sys.__excepthook__(exc_type, exc, tb)
    if found is not None:
        sys.stdout.flush()
        print(f"ERROR: {message(found)}", file=sys.stderr, flush=True)


def _is_bundle_command_line() -> bool:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) in _BUNDLE_MAIN


def install(force: bool = False) -> None:
    """Print bad-input errors as one ``ERROR:`` line (in the bundle command line, or with ``force``)."""
    if force or _is_bundle_command_line():
        sys.excepthook = _hook


def check_flags(fn: Callable[..., Any], argv: Sequence[str]) -> None:
    """Refuse ``--flags`` that ``fn`` has no parameter for, and missing required parameters."""
    params = inspect.signature(fn).parameters
    valid = ", ".join(f"--{name}" for name in params)
    args = list(argv[: argv.index("--")] if "--" in argv else argv)
    given: set[str] = set()
    positional = 0
    i = 0
    while i < len(args):
        token = args[i]
        if token.startswith("--") and len(token) > 2:
            name = token[2:].split("=", 1)[0].replace("-", "_")
            if name not in params:
                raise ValueError(f"unknown option --{name}; valid options: {valid}")
            given.add(name)
            if "=" not in token and i + 1 < len(args) and not args[i + 1].startswith("--"):
                i += 1  # its value
        else:
            positional += 1
        i += 1
    unnamed = [name for name in params if name not in given]
    missing = [name for name in unnamed[positional:] if params[name].default is inspect.Parameter.empty]
    if missing:
        raise ValueError(f"missing option --{missing[0]}; valid options: {valid}")


def run_main(fn: Callable[..., Any], argv: Sequence[str] | None = None, name: str | None = None) -> Any:
    """Check the flags, then run ``fn`` through ``fire`` (``name``: the command in its help); errors
    end on one ``ERROR:`` line."""
    import fire

    if argv is None:  # the real command line: this process ends with the outcome
        install(force=True)
        argv = sys.argv[1:]
    argv = list(argv)
    if not {"-h", "--help"} & set(argv):
        check_flags(fn, argv)
    return fire.Fire(fn, command=argv, name=name)


install()  # a no-op unless this process is the bundle command line (see the module docstring)
