"""The training run's settings: one dataclass, the defaults in one place, YAML keys named like the flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class TrainConfig:
    model: str = DEFAULT_MODEL
    data: str | None = None
    out: str | None = None
    eval_data: str | None = None
    # how long
    epochs: float = 1.0
    max_steps: int | None = None  # wins over epochs when given
    # batches: batch_size sequences per micro-batch per process; grad_accum micro-batches per optimizer step
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    packing: bool = True
    # optimizer and schedule (QLoRA paper: paged AdamW, lr 2e-4, max grad norm 0.3, constant schedule after warm-up)
    lr: float = 2e-4
    warmup_steps: int = 10
    scheduler: str = "constant"  # cosine | linear | constant
    optimizer: str = "paged_adamw"  # paged_adamw | adamw
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    # LoRA (QLoRA paper: every linear layer of the decoder)
    rank: int = 16
    alpha: float = 32
    dropout: float = 0.1
    target: str = "all-linear"
    use_rslora: bool = False
    # the 4-bit base
    quant_type: str = "nf4"
    double_quant: bool = True
    gradient_checkpointing: bool = True
    # run control
    seed: int = 0
    save_every: int = 50
    keep: int = 2
    resume: bool = False
    eval_every: int | None = None  # steps between eval-loss measurements (None: only at the end)
    skip_bad_records: bool = False
    dry_run: bool = False
    show_masked: int = 0


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ValueError(f"{path}{line}: malformed YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run config is a mapping of settings")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ValueError(f"{path}: unknown setting {key!r}")
        out[name] = value
    return out


def resolve_config(from_yaml: dict, from_flags: dict) -> TrainConfig:
    """Defaults, then the YAML file, then the flags given on the command line (a flag wins over the file)."""
    merged = {**from_yaml, **{k: v for k, v in from_flags.items() if v is not None}}
    config = TrainConfig(**merged)
    check(config)
    return config


def check(config: TrainConfig) -> None:
    if config.scheduler not in ("cosine", "linear", "constant"):
        raise ValueError(f"scheduler must be cosine, linear or constant, got {config.scheduler!r}")
    if config.optimizer not in ("paged_adamw", "adamw"):
        raise ValueError(f"optimizer must be paged_adamw or adamw, got {config.optimizer!r}")
    for name in ("batch_size", "grad_accum", "max_length", "rank", "save_every", "keep"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {config.max_steps}")


def describe(config: TrainConfig) -> str:
    """The resolved settings, as printed at the start of a run and saved beside its outputs."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
