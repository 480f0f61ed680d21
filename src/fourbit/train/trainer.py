"""The training loop, top to bottom: load the 4-bit base, add adapters, read the data, step, checkpoint, save.

One optimizer step takes the next `batch_size * grad_accum * world_size` sequences of the epoch's order; each
process takes its contiguous share and splits it into `grad_accum` micro-batches. The loss of the step is the sum
of every loss token's cross-entropy divided by the number of loss tokens in the whole step (all micro-batches, all
processes), so the gradients do not depend on how the step is split.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from fourbit.data.batching import Row, as_row, collate, count_loss_tokens, pack
from fourbit.data.dataset import Dataset, load_dataset
from fourbit.data.tokenize import IGNORE
from fourbit.models.adapters import add_adapter, save_adapter
from fourbit.models.loader import load
from fourbit.nn import qlora_layers
from fourbit.quant import native
from fourbit.train import checkpoints
from fourbit.train.config import TrainConfig, describe
from fourbit.train.loss import LossModule
from fourbit.train.paged_adamw import PagedAdamW

ADAPTER = "default"


@dataclasses.dataclass
class RunResult:
    out: Path
    steps: int
    train_loss: float
    eval_loss: float | None
    seconds: float
    tokens_per_second: float
    peak_memory_mb: float


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def release_freed_memory() -> None:
    """Hand memory freed during the step back to the OS. glibc keeps freed activations in its heaps, fragmented
    around the few tensors that outlive a step, so without this the resident set grows to several times what is
    live; trimming once per step costs a few milliseconds."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 (not glibc: AttributeError)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Join the process group when started by torchrun (gloo on CPU, nccl on GPU)."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def lr_factor(step: int, config: TrainConfig, total_steps: int) -> float:
    """Linear warm-up, then constant, linear or cosine decay to zero at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.scheduler == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    if config.scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_rows, generator=g).tolist()


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def plan_text(config: TrainConfig, model: nn.Module, data: Dataset, rows: list[Row], total_steps: int) -> str:
    trainable = sum(p.numel() for _, p in trainable_parameters(model))
    frozen_4bit = sum(layer.weight_4bit.numel for layer in qlora_layers(model).values())
    other = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    total = trainable + frozen_4bit + other
    bytes_4bit = sum(layer.weight_4bit.nbytes for layer in qlora_layers(model).values())
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    seq = max(len(r.input_ids) for r in rows)
    _, world = _world()
    tokens_per_step = sum(len(r.input_ids) for r in rows) / len(rows) * config.batch_size * config.grad_accum * world
    # adapters + their gradients + two Adam moments (paged out on CPU runs, counted anyway), all fp32
    adapter_bytes = trainable * 4 * 4
    hidden = model.config.get_text_config().hidden_size
    layers = model.config.get_text_config().num_hidden_layers
    act_bytes = config.batch_size * seq * hidden * 4 * (layers + 16)  # checkpointed layer inputs + one layer live
    estimate = bytes_4bit + dense_bytes + adapter_bytes + act_bytes
    return "\n".join([
        f"trainable parameters: {trainable:,} ({100 * trainable / total:.2f}% of {total:,})",
        f"4-bit weights: {bytes_4bit / 2**20:.1f} MiB; other frozen weights: {dense_bytes / 2**20:.1f} MiB",
        f"memory estimate: {estimate / 2**20:.0f} MiB (4-bit base + frozen tensors + adapters, grads, Adam + "
        f"activations at {config.batch_size} x {seq} tokens)",
        f"data: {data.summary()}; {len(rows)} sequences{' (packed)' if config.packing else ''}",
        f"tokens per step: about {tokens_per_step:.0f}; steps: {total_steps}",
    ])  # fmt: skip


def accumulate_gradients(loss_module: nn.Module, micro: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """Backward over one optimizer step's micro-batches (this process's share). Each micro-batch's loss sum is
    divided by the loss tokens of the whole step across all processes, so the gradients are those of the mean
    over the step however it is split. Returns (the step's mean loss over all processes, its loss tokens)."""
    _, world = _world()
    n_loss = torch.tensor(sum(count_loss_tokens(b["labels"]) for b in micro), dtype=torch.float64)
    if world > 1:
        dist.all_reduce(n_loss)
    total = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        with loss_module.no_sync() if world > 1 and not last else contextlib.nullcontext():
            loss_sum, _ = loss_module(batch)
            # DDP averages gradients over processes: scale by world so the result is sum / n_loss
            (loss_sum * (world / n_loss.item())).backward()
        total += loss_sum.detach().double()
    if world > 1:
        dist.all_reduce(total)
    return float(total / n_loss), int(n_loss)


def evaluate_loss(loss_module: LossModule, rows: list[Row], batch_size: int, pad_id: int, packed: bool) -> float:
    model = loss_module.model
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i : i + batch_size], pad_id, packed)
            s, n = loss_module(batch)
            total, count = total + float(s), count + n
    model.train(was_training)
    return total / max(1, count)


def show_masked(tokenizer, data: Dataset, n: int) -> str:
    """The first n examples as the model sees them; the text that carries loss is shown between [[ and ]]."""
    out = []
    for ex in data.examples[:n]:
        pieces, current, in_loss = [], [], False
        for tok, label in zip(ex.input_ids, ex.labels, strict=True):
            carries = label != IGNORE
            if carries != in_loss and current:
                text = tokenizer.decode(current)
                pieces.append(f"[[{text}]]" if in_loss else text)
                current = []
            in_loss = carries
            current.append(tok)
        if current:
            text = tokenizer.decode(current)
            pieces.append(f"[[{text}]]" if in_loss else text)
        header = f"--- {ex.where}: {len(ex.input_ids)} tokens, {ex.n_loss_tokens} carry loss"
        out.append(header + (" (truncated)" if ex.truncated else "") + "\n" + "".join(pieces))
    return "\n".join(out)


# Freed large tensors the allocator pool keeps for reuse during training (see fourbit.quant.native.pooled_allocator).
POOL_CACHE_BYTES = 64 << 20


def _enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing: transformers 5 renamed the switch (the old name warns and goes in v6);
    4.x has only the old one."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def train(config: TrainConfig, progress: bool = True) -> RunResult | None:
    """Fine-tune as `config` says; returns None for a dry run or --show-masked. Runs with fourbit's allocator pool
    for large CPU tensors, which keeps glibc's heap from doubling the step's resident memory."""
    with native.pooled_allocator(POOL_CACHE_BYTES):
        return _train(config, progress)


def _train(config: TrainConfig, progress: bool) -> RunResult | None:
    init_distributed()
    rank, world = _world()
    torch.manual_seed(config.seed)
    say = (lambda msg: print(msg, file=sys.stderr)) if rank == 0 else (lambda msg: None)

    model, tokenizer = load(config.model, config.quant_type, config.double_quant, progress=progress and rank == 0)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = load_dataset(config.data, tokenizer, config.max_length, config.skip_bad_records)
    for err in data.skipped[:5]:
        say(f"skipped: {err}")
    if config.show_masked:
        print(show_masked(tokenizer, data, config.show_masked))
        return None
    eval_data = load_dataset(config.eval_data, tokenizer, config.max_length) if config.eval_data else None

    add_adapter(model, ADAPTER, config.rank, config.alpha, config.dropout, config.target, config.use_rslora)
    rows = pack(data.examples, config.max_length) if config.packing else [as_row(e) for e in data.examples]
    global_batch = config.batch_size * config.grad_accum * world
    steps_per_epoch = max(1, len(rows) // global_batch)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    say(describe(config).rstrip())
    say(plan_text(config, model, data, rows, total_steps))
    if data.truncated:
        say(f"warning: {data.truncated} of {len(data.examples)} examples were longer than {config.max_length} tokens "
            "and were truncated")  # fmt: skip
    if config.dry_run:
        return None

    out = Path(config.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(describe(config))
    if config.gradient_checkpointing:
        _enable_activation_checkpointing(model)
    model.train()
    loss_module = LossModule(model)
    if world > 1:
        loss_module = nn.parallel.DistributedDataParallel(loss_module, broadcast_buffers=False)
    params = [p for _, p in trainable_parameters(model)]
    if config.optimizer == "paged_adamw":
        optimizer = PagedAdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=False)

    # --- resume ---------------------------------------------------------------------------------------------------
    step, epoch, position = 0, 0, 0
    ckpt_root = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"
    if config.resume and (latest := checkpoints.latest_checkpoint(ckpt_root)) is not None:
        adapter_state, opt_state, state = checkpoints.load_checkpoint(latest)
        missing = model.load_state_dict(adapter_state, strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"{latest}: adapter tensors do not fit this model ({missing.unexpected_keys[0]})")
        if isinstance(optimizer, PagedAdamW):
            optimizer.load_state_tensors(opt_state)
        else:
            raise ValueError("--resume needs the paged_adamw optimizer, whose state is saved as plain tensors")
        step, epoch, position = state["step"], state["epoch"], state["position"]
        say(f"resuming from {latest} (step {step})")
        if rank == 0 and metrics_path.exists():  # drop metrics logged after that checkpoint
            kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= step]
            metrics_path.write_text("".join(line + "\n" for line in kept))
    elif rank == 0:
        metrics_path.unlink(missing_ok=True)
        import shutil

        shutil.rmtree(ckpt_root, ignore_errors=True)

    pad_id = tokenizer.pad_token_id
    order = epoch_order(len(rows), config.seed, epoch)
    start_time, tokens_seen, last_loss, eval_loss = time.perf_counter(), 0, float("nan"), None
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=not progress or rank != 0,
               file=sys.stderr, dynamic_ncols=True)  # fmt: skip
    while step < total_steps:
        if position + global_batch > len(order):  # next epoch: a new order, leftovers dropped
            epoch, position = epoch + 1, 0
            order = epoch_order(len(rows), config.seed, epoch)
            if global_batch > len(order):
                raise ValueError(f"one step needs {global_batch} sequences but the data has only {len(order)}")
        step_rows = [rows[i] for i in order[position : position + global_batch]]
        mine = step_rows[rank * len(step_rows) // world : (rank + 1) * len(step_rows) // world]
        micro = [collate(mine[i : i + config.batch_size], pad_id, config.packing)
                 for i in range(0, len(mine), config.batch_size)]  # fmt: skip
        lr = config.lr * lr_factor(step, config, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, n_loss = accumulate_gradients(loss_module, micro)
        tokens_seen += sum(len(r.input_ids) for r in mine)  # real tokens, not padding
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        release_freed_memory()
        step += 1
        position += global_batch
        last_loss = step_loss
        elapsed = time.perf_counter() - start_time
        record = {"step": step, "loss": round(last_loss, 6), "lr": lr, "grad_norm": round(float(grad_norm), 6),
                  "tokens_per_s": round(tokens_seen * world / elapsed, 1), "memory_mb": round(peak_memory_mb(), 1)}  # fmt: skip
        if eval_data is not None and config.eval_every and step % config.eval_every == 0:
            eval_rows = [as_row(e) for e in eval_data.examples]
            record["eval_loss"] = round(evaluate_loss(_unwrap(loss_module), eval_rows, config.batch_size, pad_id,
                                                      False), 6)  # fmt: skip
        if rank == 0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                        mem=f"{record['memory_mb']:.0f}MB")  # fmt: skip
        bar.update(1)
        if rank == 0 and (step % config.save_every == 0 or step == total_steps):
            adapter_state = {n: p.detach() for n, p in trainable_parameters(model)}
            opt_state = optimizer.state_tensors() if isinstance(optimizer, PagedAdamW) else {}
            checkpoints.save_checkpoint(ckpt_root, step, adapter_state, opt_state,
                                        {"step": step, "epoch": epoch, "position": position,
                                         "total_steps": total_steps}, config.keep)  # fmt: skip
        if world > 1:
            dist.barrier()
    bar.close()

    seconds = time.perf_counter() - start_time
    if eval_data is not None:
        eval_rows = [as_row(e) for e in eval_data.examples]
        eval_loss = evaluate_loss(_unwrap(loss_module), eval_rows, config.batch_size, pad_id, False)
    if rank == 0:
        save_adapter(model, out, ADAPTER, base_model=str(config.model))
        from fourbit.train.plot import plot_metrics

        plot_metrics(metrics_path, out / "loss.png")
    result = RunResult(out, step, last_loss, eval_loss, seconds, tokens_seen * world / max(seconds, 1e-9),
                       peak_memory_mb())  # fmt: skip
    say(f"done: {step} steps in {seconds:.0f} s, {result.tokens_per_second:.0f} tokens/s, peak memory "
        f"{result.peak_memory_mb:.0f} MB, final train loss {last_loss:.4f}"
        + (f", eval loss {eval_loss:.4f}" if eval_loss is not None else ""))  # fmt: skip
    if rank == 0 and eval_loss is not None:
        with metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, "final_eval_loss": round(eval_loss, 6)}) + "\n")
    return result


def _unwrap(module: nn.Module) -> LossModule:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module

