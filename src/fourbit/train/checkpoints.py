"""Training checkpoints: safetensors plus JSON, written atomically; the newest complete one is found on resume.

A checkpoint is a folder `checkpoints/step-000050/` holding
  adapter.safetensors     the trainable adapter tensors (in-memory names)
  optimizer.safetensors   the optimizer's state tensors
  rng.safetensors         the torch RNG states (dropout, shuffling)
  state.json              step, data position, config summary
It is filled under a temporary name, every file fsynced, then renamed: a folder with the final name is complete.
An old checkpoint is renamed away before it is deleted, so a kill during the deletion leaves a hidden folder (removed
as stale later), never a half-deleted one under a checkpoint's name, which pruning would no longer recognise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"step-(\d+)")
PARTIAL_DIR = re.compile(r"\.step-\d+\.(?:partial|deleting)-(\d+)")  # being written or deleted by that process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(root: Path) -> None:
    """Delete half-written checkpoint folders left by a process that was killed while saving."""
    for d in root.iterdir() if root.exists() else ():
        m = PARTIAL_DIR.fullmatch(d.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)


def _remove(d: Path) -> None:
    doomed = d.with_name(f".{d.name}.deleting-{os.getpid()}")
    d.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: Path, step: int, adapter: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor], state: dict, keep: int
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file({k: v.detach().contiguous() for k, v in adapter.items()}, str(tmp / "adapter.safetensors"))
    save_file({k: v.contiguous() for k, v in optimizer.items()}, str(tmp / "optimizer.safetensors"))
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():
        _remove(final)
    tmp.rename(final)
    _fsync(root)
    for old in sorted(checkpoint_dirs(root))[:-keep]:
        _remove(old[1])
    remove_stale_partials(root)
    return final


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.exists():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_DIR.fullmatch(d.name)
        if m and (d / "state.json").exists():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1][1] if dirs else None


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(adapter tensors, optimizer tensors, state); restores the RNG states."""
    try:
        adapter = load_file(path / "adapter.safetensors")
        optimizer = load_file(path / "optimizer.safetensors")
        rng = load_file(path / "rng.safetensors")
        state = json.loads((path / "state.json").read_text())
    except Exception as err:
        raise ValueError(f"{path}: unreadable checkpoint ({err})") from None
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return adapter, optimizer, state
