"""Writing a safetensors file one tensor at a time, so a model larger than memory can be written.

The format (safetensors' own spec): 8 bytes little-endian header length N, N bytes of JSON mapping each name to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data that follows, in the order written) plus an
optional "__metadata__" of strings, padded with spaces to a multiple of 8; then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8", torch.int8: "I8",
          torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL", torch.float64: "F64"}  # fmt: skip


def write_streaming(
    path: str | Path,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor | Iterable[torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the tensors named in `specs` (name, dtype, shape), asking `produce(name)` for each in turn; only one is
    held at a time. `produce` may also return an iterable of chunks of the declared dtype whose elements, in
    row-major order, make the tensor: each chunk is written before the next is asked for, so not even one whole
    tensor need be held. Written under a temporary name, fsynced, then renamed."""
    path = Path(path)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        n = 1
        for d in shape:
            n *= d
        size = n * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, dtype, shape in specs:
                tensor = produce(name)
                if isinstance(tensor, torch.Tensor):
                    if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                        raise ValueError(f"{name}: produced {tensor.dtype} {list(tensor.shape)}, declared {dtype} {list(shape)}")
                    _write_tensor(f, tensor)
                    continue
                expected, count = math.prod(shape), 0
                for chunk in tensor:
                    count += chunk.numel()
                    if chunk.dtype != dtype or count > expected:
                        raise ValueError(f"{name}: produced a chunk of {chunk.dtype} {list(chunk.shape)} ({count} "
                                         f"elements so far), declared {dtype} {list(shape)}")  # fmt: skip
                    _write_tensor(f, chunk)
                if count != expected:
                    raise ValueError(f"{name}: produced {count} elements in chunks, declared {dtype} {list(shape)}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_tensor(f, tensor: torch.Tensor) -> None:
    f.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())  # no bytes copy


def mmap_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view on a read-only memory map: nothing is copied, and the pages
    are file-backed (the OS reads them in on use and may drop them again)."""
    import mmap

    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    (size,) = struct.unpack("<Q", mapped[:8])
    header = json.loads(mapped[8 : 8 + size])
    names = {v: k for k, v in DTYPES.items()}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = names[info["dtype"]]
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            out[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        with warnings.catch_warnings():  # the map is read-only and the tensors are only read
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=8 + size + begin)
        out[name] = flat.view(info["shape"])
    return out
