"""Paged AdamW: optimizer state kept in a page store away from the compute device, paged in per parameter.

QLoRA's paged optimizers keep Adam's two moment buffers where a memory spike cannot crash the run, and bring each
parameter's state in only for its update. Here the store is
- on a CPU-only run: a memory-mapped file (the OS pages it in and out; resident memory holds only what is in use);
- with parameters on an accelerator: pinned host memory, each parameter's state copied in on a side stream while
  the previous parameter updates, and copied back after.
The update is torch.optim.AdamW's (decoupled weight decay, bias correction), so results match it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


class PagedAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        page_dir: str | Path | None = None,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.params_in_order = [p for g in self.param_groups for p in g["params"]]
        total = sum(p.numel() for p in self.params_in_order)
        self._offsets = []
        offset = 0
        for p in self.params_in_order:
            self._offsets.append(offset)
            offset += p.numel()
        on_cpu = all(p.device.type == "cpu" for p in self.params_in_order)
        if on_cpu:
            # unlinked at once: the pages live as long as this optimizer, and nothing is left on disk after a crash
            fd, name = tempfile.mkstemp(prefix="fourbit-adam-", suffix=".pages", dir=page_dir)
            os.close(fd)
            self._store = torch.from_file(name, shared=True, size=2 * total, dtype=torch.float32)
            os.unlink(name)
            self._store.zero_()
        else:
            self._store = torch.zeros(2 * total, dtype=torch.float32).pin_memory()
        self._total = total
        self.steps = 0

    def _host_state(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        p, off = self.params_in_order[i], self._offsets[i]
        m = self._store[off : off + p.numel()].view_as(p)
        v = self._store[self._total + off : self._total + off + p.numel()].view_as(p)
        return m, v

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.steps += 1
        order = [i for i, p in enumerate(self.params_in_order) if p.grad is not None]
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        device_copy = any(self.params_in_order[i].device.type != "cpu" for i in order)
        stream = torch.cuda.Stream() if device_copy and torch.cuda.is_available() else None

        def page_in(i: int):
            m, v = self._host_state(i)
            if self.params_in_order[i].device.type == "cpu":
                return m, v
            dev = self.params_in_order[i].device
            if stream is None:
                return m.to(dev), v.to(dev)
            with torch.cuda.stream(stream):
                return m.to(dev, non_blocking=True), v.to(dev, non_blocking=True)

        prefetched = page_in(order[0]) if order else None
        for k, i in enumerate(order):
            p = self.params_in_order[i]
            if stream is not None:
                torch.cuda.current_stream().wait_stream(stream)
            m, v = prefetched
            if k + 1 < len(order):
                prefetched = page_in(order[k + 1])  # the next parameter's state comes in while this one updates
            g = group_of[id(p)]
            self._update(p, p.grad, m, v, g)
            if p.device.type != "cpu":
                host_m, host_v = self._host_state(i)
                host_m.copy_(m, non_blocking=True)
                host_v.copy_(v, non_blocking=True)
        if stream is not None:
            torch.cuda.synchronize()
        return loss

    def _update(self, p, grad, m, v, group) -> None:
        # the arithmetic of torch.optim.AdamW's single-tensor path, in the same order
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        step = self.steps
        p.mul_(1 - lr * wd)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (v.sqrt() / bias_correction2**0.5).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)

    # --- checkpoints: plain tensors, saved as safetensors by the trainer -------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"exp_avg_and_sq": self._store.clone(), "step": torch.tensor([self.steps], dtype=torch.int64)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors["exp_avg_and_sq"].numel() != self._store.numel():
            raise ValueError(
                f"optimizer state holds {tensors['exp_avg_and_sq'].numel()} values, this model's adapters need "
                f"{self._store.numel()}"
            )
        self._store.copy_(tensors["exp_avg_and_sq"])
        self.steps = int(tensors["step"][0])

    @property
    def state_bytes(self) -> int:
        return self._store.numel() * 4
