"""safetensors reading (memory-mapped) and writing (atomic), with no pickle anywhere.

The format is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets}}`` (plus an optional ``__metadata__``), then the raw little-endian data. Reading maps the
file and returns numpy views, so a 22 GiB checkpoint costs no RAM until a tensor is touched; bfloat16
comes back as ``ml_dtypes.bfloat16`` (the dtype JAX uses).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Mapping

import ml_dtypes
import numpy as np

__all__ = [
    "read_safetensors",
    "write_safetensors",
    "read_diffusers_folder",
    "load_state_dict",
    "PICKLE_SUFFIXES",
]

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as read-only numpy views of a memory map."""
    path = os.fspath(path)
    if path.endswith(PICKLE_SUFFIXES):
        raise ValueError(f"refusing to read {path!r}: pickle-based checkpoints are not supported, use .safetensors")
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path!r} is not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER:
            raise ValueError(f"{path!r} is not a safetensors file (header length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path!r} is not a safetensors file (bad JSON header: {e})") from None
    header.pop("__metadata__", None)
    start = 8 + header_len
    size = os.path.getsize(path)
    if size == start:
        data = np.zeros((0,), np.uint8)
    else:
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=start)
    out = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path!r}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or end > size - start:
            raise ValueError(f"{path!r}: tensor {name!r} has inconsistent offsets {info['data_offsets']}")
        out[name] = data[begin:end].view(dtype).reshape(shape)
    return out


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes ``tensors`` (numpy or JAX arrays) to ``path`` atomically (temp file + rename)."""
    path = os.fspath(path)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        if array.dtype not in _NAMES:
            raise TypeError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot hold")
        nbytes = array.size * array.dtype.itemsize
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
        arrays.append(array)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for array in arrays:
                if array.size == 0:
                    continue
                # write in slices along axis 0 to keep peak memory low for big memory-mapped inputs
                array = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)
                for i in range(0, array.shape[0], 1024):
                    f.write(np.ascontiguousarray(array[i:i + 1024]).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_diffusers_folder(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(config dict, state dict) of a diffusers model folder: ``config.json`` plus either one
    ``*.safetensors`` file or shards listed in ``*.safetensors.index.json``. A pipeline folder with a
    ``transformer/`` subfolder is accepted too."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "transformer")):
        path = os.path.join(path, "transformer")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in diffusers folder {path!r}")
    with open(config_path) as f:
        config = json.load(f)
    names = sorted(os.listdir(path))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if indexes:
        if len(indexes) > 1:
            raise ValueError(f"{path!r} holds several shard indexes: {indexes}")
        with open(os.path.join(path, indexes[0])) as f:
            weight_map = json.load(f)["weight_map"]
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            tensors = read_safetensors(os.path.join(path, shard))
            expected = {k for k, v in weight_map.items() if v == shard}
            if set(tensors) != expected:
                raise ValueError(
                    f"shard {shard!r} does not match its index: missing {sorted(expected - set(tensors))}, "
                    f"extra {sorted(set(tensors) - expected)}"
                )
            state.update(tensors)
        return config, state
    files = [n for n in names if n.endswith(".safetensors")]
    if len(files) != 1:
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        hint = f" (pickle files {pickles} are never read)" if pickles else ""
        raise ValueError(f"expected one .safetensors file or a shard index in {path!r}, found {files}{hint}")
    return config, read_safetensors(os.path.join(path, files[0]))


def load_state_dict(path: str | os.PathLike) -> tuple[dict | None, dict[str, np.ndarray]]:
    """(config dict or None, state dict) from a diffusers folder or a single .safetensors file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return read_diffusers_folder(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint: {path!r}")
    return None, read_safetensors(path)
