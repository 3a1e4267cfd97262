"""The `edgeseg` command (also `python -m edgeseg`). Each subcommand lives in
`edgeseg/commands/<name>.py` with `add_arguments(parser)` and `run(args) -> int`; modules load
only when their command runs, so `edgeseg run` never imports torch.

What reaches the terminal besides results is set up here, once: progress bars on stderr when it
is a terminal (`--quiet` or `--json` turn them off), our warnings as one line each, and other
libraries' chatter (their warnings, log lines, OpenCV's `[ WARN ]`) only with `--verbose`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import warnings

from edgeseg import progress
from edgeseg.errors import USER_ERRORS, Terminated, interrupt_status, use_flags

COMMANDS = {
    "demo": "convert the default model and stream a synthetic clip through the runtime",
    "convert": "compile a model (nn.Module factory, checkpoint, TorchScript, ONNX) into a bundle",
    "calibrate": "quantize a bundle to INT8 with calibration frames, measuring accuracy before and after",
    "build": "build a TensorRT engine for a bundle",
    "run": "stream a source through a bundle",
    "bench": "measure engine and pipeline speed of a bundle",
    "eval": "accuracy of a bundle's artifacts or a checkpoint on labelled data",
    "train": "train or fine-tune a zoo model",
    "inspect": "show a bundle, an ONNX file or a checkpoint",
}


class CLIError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from edgeseg import __version__

    parser = argparse.ArgumentParser(prog="edgeseg", description="Edge deployment SDK for image segmentation.")
    parser.add_argument("--version", action="version", version=f"edgeseg {__version__}")
    add_output_options(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, helptext in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.set_defaults(_module=f"edgeseg.commands.{name}")
        add_output_options(p)
    return parser


def add_output_options(p: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    """-q/-v, accepted before and after the command (`edgeseg -v run ...`, `edgeseg run ... -v`)."""
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="log more, with other libraries' warnings and messages (OpenCV, ONNX Runtime, coremltools, torch)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Only the named command's module loads and adds its arguments (so `--help` shows them too).
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in COMMANDS:
        module = importlib.import_module(f"edgeseg.commands.{command}")
        module.add_arguments(parser._subparsers._group_actions[0].choices[command])
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    setup_console(verbose=args.verbose, quiet=args.quiet or getattr(args, "json", None) is True)
    use_flags(True)  # messages name --flags, not the Python keywords behind them
    previous = _on_sigterm()
    try:
        status = int(module.run(args) or 0)
        sys.stdout.flush()  # inside the try: a reader that left shows here, not at interpreter exit
        return status
    except KeyboardInterrupt as e:
        print("terminated" if isinstance(e, Terminated) else "interrupted", file=sys.stderr)
        return interrupt_status(e)
    except BrokenPipeError:
        # the reader went away (`edgeseg inspect b | head`): stop quietly, as a C tool killed by SIGPIPE
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 141
    except Exception as e:
        if _is_user_error(e) and not args.verbose:
            print(f"edgeseg {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        use_flags(False)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _on_sigterm():
    """Handle SIGTERM like Ctrl-C (see errors.Terminated); a second one kills at once. Returns the
    handler it replaced (None off the main thread, where Python cannot set one)."""
    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, terminate)


OUR_PACKAGES = ("edgeseg", "converters", "calibration", "runtime")
_ROOTS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), p) + os.sep for p in OUR_PACKAGES)


def _ours(filename: str, module: str) -> bool:
    """A warning raised in, or of a category defined in, this project's packages."""
    return module.split(".")[0] in OUR_PACKAGES or os.path.abspath(filename).startswith(_ROOTS)


class _ConsoleHandler(logging.Handler):
    """Log records as one line each through the progress stream (so bars stay intact). Without
    --verbose: our warnings and errors, and only errors from other libraries."""

    def __init__(self, verbose: bool):
        super().__init__(logging.INFO if verbose else logging.WARNING)
        self.verbose = verbose

    def emit(self, record: logging.LogRecord) -> None:
        ours = record.name.split(".")[0] == "edgeseg"
        if not (ours or self.verbose or record.levelno >= logging.ERROR):
            return
        try:
            text = record.getMessage()
            if record.exc_info and self.verbose:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            prefix = record.levelname.lower() if ours else f"{record.levelname.lower()} ({record.name})"
            progress.write(f"{prefix}: {text}")
        except Exception:
            self.handleError(record)


def setup_console(verbose: bool = False, quiet: bool = False) -> None:
    """Progress bars, log lines and warnings for a command-line run (see the module docstring)."""
    progress.configure(enabled=False if quiet else None, third_party=verbose)
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:
        root.removeHandler(h)
    root.addHandler(_ConsoleHandler(verbose))
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        # torch logs through a handler of its own, set up when it is imported: errors only
        os.environ.setdefault("TORCH_LOGS", "-torch")
        logging.getLogger("torch").setLevel(logging.ERROR)
        # OpenCV's and FFmpeg's C++ logging (read when cv2 / a capture first starts); our own
        # errors say what went wrong and what to do
        os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
        if "cv2" in sys.modules:
            cv2 = sys.modules["cv2"]
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

    def show(message, category, filename, lineno, file=None, line=None):
        if _ours(filename, category.__module__):
            progress.write(f"warning: {message}")
        elif verbose:
            progress.write(warnings.formatwarning(message, category, filename, lineno, line).rstrip())

    warnings.showwarning = show


def _is_user_error(e: Exception) -> bool:
    """Errors that come from bad input (named in their message) rather than bugs."""
    return isinstance(e, USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
