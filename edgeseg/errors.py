"""Exception types for bad input, missing hardware or missing optional packages.

Every error a user can cause derives from `EdgesegError`; its message names the problem and the
fix. The CLI prints such errors without a traceback and exits 2. This module imports nothing, so
any part (the torch-free runtime included) can use it.
"""
from __future__ import annotations


class EdgesegError(Exception):
    """Base of user-facing errors."""


class SourceError(EdgesegError, RuntimeError):
    """A frame source that cannot be opened or read."""


class ConversionError(EdgesegError, RuntimeError):
    """A model that cannot be loaded, exported or converted."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the CLI's handler: it unwinds like Ctrl-C (outputs
    finalised, stats written, temporaries removed), and the command exits with 143."""


def interrupt_status(e: BaseException) -> int:
    """The exit status of an interrupted command: 143 after SIGTERM, 130 after Ctrl-C."""
    return 143 if isinstance(e, Terminated) else 130


USER_ERRORS: tuple[type[BaseException], ...] = (EdgesegError, FileNotFoundError)


# Messages name options the way the user gave them: `--eval-data` on the command line (the CLI
# calls `use_flags()`), `eval_data` from Python.
_FLAGS = False


def use_flags(on: bool = True) -> None:
    global _FLAGS
    _FLAGS = bool(on)


def option(name: str, flag: str | None = None, value=None) -> str:
    """How a message names keyword `name`: '--eval-data' on the command line, 'eval_data' in
    Python; `flag` where the command line spells it differently (calib_method -> '--method');
    with `value`: '--output mask' / "output='mask'"."""
    if _FLAGS:
        text = flag or "--" + name.replace("_", "-")
        return text if value is None else f"{text} {value}"
    return name if value is None else f"{name}={value!r}"
