"""Writing a safetensors file one tensor at a time, so a model larger than memory can be written.

The format (safetensors' own spec): 8 bytes little-endian header length N, N bytes of JSON mapping each name to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data that follows, in the order written) plus an
optional "__metadata__" of strings, padded with spaces to a multiple of 8; then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8", torch.int8: "I8",
          torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL", torch.float64: "F64"}  # fmt: skip


def write_streaming(
    path: str | Path,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the tensors named in `specs` (name, dtype, shape), asking `produce(name)` for each in turn; only one is
    held at a time. Written under a temporary name, fsynced, then renamed."""
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
                if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"{name}: produced {tensor.dtype} {list(tensor.shape)}, declared {dtype} {list(shape)}")
                f.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
