"""A streaming safetensors reader: one tensor at a time into numpy, bf16 included, no torch.

The safetensors layout is an 8-byte little-endian header length, a JSON header mapping each name to
`{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the end of the header),
then the raw little-endian data.
"""

from __future__ import annotations

import json
import os
import struct
import ml_dtypes
import numpy as np

from .io import CheckpointError

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("bool"),
}


class SafetensorsFile:
    """Header of one `.safetensors` file; `read(name)` returns a fresh numpy array."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path!r} is not a safetensors file (truncated header)")
            (n,) = struct.unpack("<Q", head)
            if n > os.path.getsize(path) - 8:
                raise CheckpointError(f"{path!r} is not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header

    def names(self) -> list[str]:
        """Tensor names in file order (so reads are sequential)."""
        return sorted(self.entries, key=lambda k: self.entries[k]["data_offsets"][0])

    def read(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e["dtype"] not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} in {self.path!r} has unsupported dtype {e['dtype']!r}")
        dtype = _DTYPES[e["dtype"]]
        begin, end = e["data_offsets"]
        shape = tuple(e["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dtype.itemsize:
            raise CheckpointError(f"tensor {name!r} in {self.path!r}: {end - begin} bytes for shape {shape} {e['dtype']}")
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            out = np.fromfile(f, dtype=dtype, count=count)
        if out.size != count:
            raise CheckpointError(f"tensor {name!r} in {self.path!r} is truncated")
        return out.reshape(shape)


def model_files(folder: str) -> list[str]:
    """The safetensors files of a HF model folder: the index's shards, or `model.safetensors`."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(folder, name)):
                raise CheckpointError(f"shard {name!r} listed in {index!r} is missing")
        return [os.path.join(folder, name) for name in files]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(
        f"no model.safetensors or model.safetensors.index.json in {folder!r} "
        "(only safetensors checkpoints are supported, not pytorch .bin)")

