"""The `fourbit` command: argument parsing and messages only; each command calls one function from a floor below."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback (unless --debug)."""


def _model_dir(model: str) -> Path:
    from fourbit.models.bundled import bundled_model_dir, is_bundled_name

    if is_bundled_name(model):
        return bundled_model_dir(model)
    path = Path(model)
    if not path.is_dir():
        raise UserError(f"{model}: not a model folder and not a bundled model name")
    return path


def cmd_report(args: argparse.Namespace) -> None:
    from fourbit.models.report import format_report, quantization_report

    rows = quantization_report(_model_dir(args.model), args.quant_type, args.blocksize, not args.no_double_quant)
    print(format_report(rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fourbit", description="QLoRA fine-tuning: 4-bit base, LoRA adapters.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    report = sub.add_parser("report", help="quantize a model's linear weights and report size and error")
    report.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model folder or bundled name")
    report.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    report.add_argument("--blocksize", type=int, default=64)
    report.add_argument("--no-double-quant", action="store_true")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, FileNotFoundError, ValueError) as err:
        if args.debug:
            raise
        print(f"fourbit: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
