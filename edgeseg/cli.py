"""The `edgeseg` command. Each subcommand lives in `edgeseg/commands/<name>.py` with
`add_arguments(parser)` and `run(args) -> int`; modules load only when their command runs, so
`edgeseg run` never imports torch."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from edgeseg.errors import USER_ERRORS

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
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, helptext in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.set_defaults(_module=f"edgeseg.commands.{name}")
    return parser


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
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if _is_user_error(e) and not args.verbose:
            print(f"edgeseg {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


def _is_user_error(e: Exception) -> bool:
    """Errors that come from bad input (named in their message) rather than bugs."""
    return isinstance(e, USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
