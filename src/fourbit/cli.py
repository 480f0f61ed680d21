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


def cmd_quantize(args: argparse.Namespace) -> None:
    from fourbit.models.quantize_checkpoint import quantize_checkpoint

    out = quantize_checkpoint(args.model, args.out, args.quant_type, not args.no_double_quant, args.blocksize)
    print(f"wrote {out}", file=sys.stderr)


def _load_for_generation(args: argparse.Namespace):
    import fourbit

    adapters = _parse_adapters(args.adapter)
    model, tokenizer = fourbit.load(args.model, adapter=adapters or None)
    if adapters and args.use:
        from fourbit.nn import set_active_adapters

        set_active_adapters(model, args.use)
    return model, tokenizer


def _parse_adapters(items: list[str] | None) -> dict[str, str] | list[str]:
    """`--adapter DIR` (named after the folder) or `--adapter name=DIR`, repeatable."""
    if not items:
        return {}
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        if name in named:
            raise UserError(f"--adapter {item}: the name {name!r} is given twice")
        named[name] = path
    return named


def cmd_generate(args: argparse.Namespace) -> None:
    from fourbit.serve.generate import generate_records, generate_text

    if (args.prompt is None) == (args.data is None):
        raise UserError("give either --prompt TEXT or --data IN.jsonl --out OUT.jsonl")
    if args.data is not None and args.out is None:
        raise UserError("--data needs --out OUT.jsonl")
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed, chat=not args.no_chat)  # fmt: skip
    if args.prompt is not None:
        model, tokenizer = _load_for_generation(args)

        def show(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        generate_text(model, tokenizer, args.prompt, on_text=show, **sampling)
        sys.stdout.write("\n")
        return
    from fourbit.atomic import write_jsonl_atomic
    from fourbit.data.records import read_records

    records = read_records(args.data)  # bad input fails before the model loads
    model, tokenizer = _load_for_generation(args)
    answered = generate_records(model, tokenizer, records, batch_size=args.batch_size, **sampling)
    write_jsonl_atomic(args.out, answered)
    print(f"wrote {len(answered)} records to {args.out}", file=sys.stderr)


TRAIN_HELP = {
    "model": "model folder, .gguf file or bundled name",
    "data": "training records: JSONL, JSON, Parquet, CSV or a datasets folder",
    "out": "output folder (adapter, metrics, loss plot, checkpoints)",
    "eval_data": "held-out records for the eval loss",
    "epochs": "passes over the data (max-steps wins)",
    "max_steps": "optimizer steps to run",
    "batch_size": "sequences per micro-batch per process",
    "grad_accum": "micro-batches per optimizer step",
    "target": "all-linear, or module names such as q_proj,v_proj",
    "save_every": "steps between checkpoints",
    "keep": "checkpoints to keep",
    "resume": "continue from the newest complete checkpoint in OUT",
    "dry_run": "print the plan (parameters, memory, tokens, steps) and exit",
    "show_masked": "print the first N examples with the loss-carrying text in [[ ]] and exit",
    "skip_bad_records": "skip and count bad records instead of stopping",
}


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, named like its YAML key; defaults stay None so the YAML file and the
    dataclass defaults show through (a flag wins over the file)."""
    import dataclasses
    import typing

    from fourbit.train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    parser.add_argument("--config", help="YAML file of settings (keys named like the flags)")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        helptext = TRAIN_HELP.get(field.name, "") + f" (default: {field.default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            parser.add_argument(flag, type=base, default=None, help=helptext)


def cmd_train(args: argparse.Namespace) -> None:
    import dataclasses

    from fourbit.train.config import TrainConfig, load_yaml, resolve_config
    from fourbit.train.trainer import train

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    config = resolve_config(load_yaml(args.config) if args.config else {}, flags)
    if config.data is None:
        raise UserError("--data FILE is required (or `data:` in the --config file)")
    if config.out is None and not (config.dry_run or config.show_masked):
        raise UserError("--out DIR is required (or `out:` in the --config file)")
    train(config)


def cmd_eval(args: argparse.Namespace) -> None:
    from fourbit.serve.evaluate import evaluate, format_eval

    adapters = _parse_adapters(args.adapter)
    report = evaluate(args.model, args.data, adapters or None, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, max_length=args.max_length, out=args.out)  # fmt: skip
    print(format_eval(report))


def cmd_merge(args: argparse.Namespace) -> None:
    from fourbit.ship.merge import merge

    report = merge(args.model, args.adapter, args.out, args.dtype, args.into, args.quantize)
    print(report.text())
    print(f"wrote {args.out} (report: {Path(args.out) / 'merge_report.json'})", file=sys.stderr)


def cmd_export_gguf(args: argparse.Namespace) -> None:
    from fourbit.ship.gguf_export import export_gguf

    out = export_gguf(args.model, args.out, args.adapter, args.type, args.lora_only)
    print(f"wrote {out}", file=sys.stderr)


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

    quant = sub.add_parser("quantize", help="write a 4-bit checkpoint in the transformers + bitsandbytes layout")
    quant.add_argument("model", help="model folder, .gguf file or bundled name")
    quant.add_argument("--out", required=True, help="output folder")
    quant.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    quant.add_argument("--blocksize", type=int, default=64)
    quant.add_argument("--no-double-quant", action="store_true")
    quant.set_defaults(func=cmd_quantize)

    gen = sub.add_parser("generate", help="complete a prompt (streamed) or every record of a JSONL file")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="model folder, .gguf file or bundled name")
    gen.add_argument("--adapter", action="append", help="adapter folder, or name=folder; repeatable")
    gen.add_argument("--use", help="which adapter(s) to apply, comma-separated (default: all given)")
    gen.add_argument("--prompt", help="text to complete")
    gen.add_argument("--data", help="JSONL of records (messages or prompt) to answer")
    gen.add_argument("--out", help="JSONL to write the answered records to (with --data)")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    gen.set_defaults(func=cmd_generate)

    tr = sub.add_parser("train", help="QLoRA fine-tuning: train a LoRA adapter on a 4-bit base")
    _add_train_flags(tr)
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="loss, perplexity and exact-match accuracy on a data file")
    ev.add_argument("--model", default=DEFAULT_MODEL, help="model folder, .gguf file or bundled name")
    ev.add_argument("--adapter", action="append", help="adapter folder, or name=folder; repeatable")
    ev.add_argument("--data", required=True, help="records; those with a reference answer are scored exactly")
    ev.add_argument("--out", help="also write the answered records to this JSONL")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--max-length", type=int, default=1024)
    ev.set_defaults(func=cmd_eval)

    mg = sub.add_parser("merge", help="fold an adapter into the weights: a standard HF folder")
    mg.add_argument("--model", default=DEFAULT_MODEL, help="base model folder, .gguf file or bundled name")
    mg.add_argument("--adapter", required=True, help="adapter folder (PEFT layout)")
    mg.add_argument("--out", required=True, help="output folder")
    mg.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    mg.add_argument("--into", choices=["dequantized", "original"], default="dequantized",
                    help="add s*B*A to the NF4-dequantized weights (what the adapter was trained against) or to the "
                    "original 16-bit weights")  # fmt: skip
    mg.add_argument("--quantize", choices=["nf4", "fp4"], help="write the merged model back in 4 bits")
    mg.set_defaults(func=cmd_merge)

    gg = sub.add_parser("export-gguf", help="the (merged) model, or the adapter alone, as GGUF for llama.cpp")
    gg.add_argument("--model", default=DEFAULT_MODEL, help="base model folder, .gguf file or bundled name")
    gg.add_argument("--adapter", help="adapter folder to merge in (or, with --lora-only, to export)")
    gg.add_argument("--out", required=True, help="output .gguf file")
    gg.add_argument("--type", choices=["f16", "f32", "q8_0", "q4_0"], default="f16")
    gg.add_argument("--lora-only", action="store_true", help="write the adapter alone as a llama.cpp LoRA GGUF")
    gg.set_defaults(func=cmd_export_gguf)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, FileNotFoundError, ValueError, KeyError) as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # KeyError's str() adds quotes
        print(f"fourbit: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
