"""`clipdeploy`: assembles the subcommands (each package's command.py) and handles output and errors.

Errors print one line (no traceback unless --verbose) and exit 2 for usage and input errors, 1 for
failed checks.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipdeploy import __version__, deps, progress
from clipdeploy.artifact import staging
from clipdeploy.benchmarks.command import add_bench
from clipdeploy.bulk.command import add_embed_dataset
from clipdeploy.engines.command import add_build, add_validate
from clipdeploy.errors import AccuracyError, ClipDeployError
from clipdeploy.export.command import add_export, add_models
from clipdeploy.artifact.command import add_inspect
from clipdeploy.pipeline.command import add_run
from clipdeploy.quantize.command import add_quantize
from clipdeploy.runtime.command import add_embed
from clipdeploy.serve.command import add_serve
from clipdeploy.triton.command import add_triton

# Every subcommand, in `--help` order: each package's command.py builds its parser from its config
# dataclass (clipdeploy.options); this module only assembles them and turns errors into one line.
COMMANDS = (
    add_export, add_quantize, add_build, add_validate, add_embed, add_embed_dataset, add_inspect, add_models, add_bench, add_run,
    add_triton, add_serve,
)  # fmt: skip


# ---- main ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipdeploy",
        description="Deployment compiler for OpenCLIP models: validated ONNX, a torch-free runtime.",
    )
    parser.add_argument("--version", action="version", version=f"clipdeploy {__version__}")
    _add_output_options(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for command in sub.choices.values():  # also after the command: `clipdeploy export ... --quiet`
        _add_output_options(command, default=argparse.SUPPRESS)
    return parser


def _add_output_options(parser: argparse.ArgumentParser, default: Any) -> None:
    # SUPPRESS on the subcommands, so an option given only before the command is not reset after it.
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default,
        help="log clipdeploy's steps (not other libraries' INFO) and show full tracebacks",
    )  # fmt: skip
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default,
        help="no progress display (it is shown only when stderr is a terminal)",
    )  # fmt: skip


def _print_report(report: dict[str, Any]) -> None:
    """The figures behind a failed check, one line per tower or check."""
    for key, value in report.items():
        if isinstance(value, dict) and ("min_cosine" in value or "passed" in value):
            figures = ", ".join(
                f"{k}={v:.7g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in value.items()
                if isinstance(v, (int, float, bool, str))
            )
            print(f"  {key}: {figures}", file=sys.stderr)
        elif key == "top1_agreement":
            print(f"  top-1 agreement: {value:.4f}", file=sys.stderr)


def _setup_output(*, verbose: bool, quiet: bool) -> None:
    """Progress on a terminal unless --quiet; INFO logs for clipdeploy's own loggers only with --verbose."""
    progress.configure(not quiet)
    if not progress.active():
        # huggingface_hub reads this when imported (later, lazily): no download bars where we show none.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, progress.LogHandler)]:
        root.removeHandler(h)  # main() called again in one process: one handler, not two
    handler = progress.LogHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    # open_clip logs on the root logger and onnxscript/onnx_ir/torch.onnx on their own, at INFO by
    # the dozen: third-party loggers stay at WARNING even with --verbose (ERROR without it).
    root.setLevel(logging.WARNING if verbose else logging.ERROR)
    logging.getLogger("clipdeploy").setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore")
    else:
        logging.captureWarnings(True)  # through the handler above, so a warning does not tear a bar


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    deps.command = f"clipdeploy {args.command}"  # so a missing optional library is reported for this command
    _setup_output(verbose=args.verbose, quiet=args.quiet)
    try:
        return int(args.func(args))
    except ClipDeployError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"clipdeploy: error: {e}", file=sys.stderr)
        if isinstance(e, AccuracyError) and e.report:
            _print_report(e.report)
        return e.exit_code
    except PermissionError as e:
        # A file this user may not read or write, where no stage expected one: still one line.
        if args.verbose:
            traceback.print_exc()
        where = e.filename or "a file"
        print(
            f"clipdeploy: error: permission denied on {str(where)!r} ({e.strerror or e}); it belongs to another "
            "user or its mode forbids this: fix its permissions (chmod) or run as its owner",
            file=sys.stderr,
        )
        return 2
    except OSError as e:
        if e.errno != errno.EROFS:
            raise
        # A write on a read-only mount where no stage expected one: one line naming the directory.
        if args.verbose:
            traceback.print_exc()
        folder = Path(str(e.filename)).parent if e.filename else Path(".")
        print(f"clipdeploy: error: {staging.not_writable(folder, e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipdeploy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
