"""safetensors reading (memory-mapped) and writing (atomic), with no pickle anywhere.

The format is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets}}`` (plus an optional ``__metadata__``), then the raw little-endian data. Reading maps the
file and returns numpy views, so a 22 GiB checkpoint costs no RAM until a tensor is touched; bfloat16
comes back as ``ml_dtypes.bfloat16`` (the dtype JAX uses).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import struct
from typing import Callable, Mapping

import ml_dtypes
import numpy as np

__all__ = [
    "read_safetensors",
    "write_safetensors",
    "read_diffusers_folder",
    "load_state_dict",
    "atomic_write",
    "remove_stale_temp_files",
    "TEMP_PREFIX",
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

# Temp files of atomic writes: ``.chipmunk-tmp-<pid>-<random><suffix>`` beside the target. The pid lets a later
# run remove the files a killed process left (remove_stale_temp_files) without touching those of a live one.
TEMP_PREFIX = ".chipmunk-tmp-"
_TEMP_NAME = re.compile(rf"^{re.escape(TEMP_PREFIX)}(\d+)-")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process; or not a pid: keep the file
        return True
    return True


def remove_stale_temp_files(directory: str | os.PathLike) -> list[str]:
    """Removes the ``TEMP_PREFIX`` temp files in ``directory`` whose writing process is gone (a conversion killed
    by SIGKILL or a power cut); those of live processes (this one, a concurrent conversion) stay. Returns the
    removed paths. A missing directory or a file that vanishes meanwhile is not an error."""
    directory = os.fspath(directory)
    removed = []
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for name in names:
        m = _TEMP_NAME.match(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        path = os.path.join(directory, name)
        try:
            if os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)
                removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def atomic_write(path: str | os.PathLike, write: Callable, *, binary: bool = True, suffix: str = "") -> None:
    """Calls ``write(f)`` on a temp file beside ``path`` then renames it onto ``path`` (fsync'd first), so readers
    see the old file or the whole new one. The temp file is named ``TEMP_PREFIX<pid>-...`` and is removed on
    every exit Python controls (an exception, KeyboardInterrupt, a SIGTERM the convert CLI turns into one); one a
    SIGKILL leaves behind is removed by the next write into the same folder (``remove_stale_temp_files``).
    The file gets the user's normal permissions (0o666 less the umask), not mkstemp's owner-only 0o600."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale_temp_files(directory)
    while True:
        tmp = os.path.join(directory, f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}{suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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
        raw = f.read(header_len)
        if len(raw) != header_len and raw[:1] == b"{":  # a JSON header cut short (else: not safetensors at all)
            raise ValueError(f"{path!r} is truncated: it promises a {header_len}-byte header, the file holds "
                             f"{len(raw)} bytes after the length")
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path!r} is not a safetensors file (bad JSON header: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path!r} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    start = 8 + header_len
    size = os.path.getsize(path)
    promised = max((_end_offset(path, name, info) for name, info in header.items()), default=0)
    if promised > size - start:
        raise ValueError(f"{path!r} is truncated: the header promises {promised} bytes of data, the file holds "
                         f"{size - start}")
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


def _end_offset(path: str, name: str, info) -> int:
    """The end of tensor ``name``'s data (its second data offset), checked to be a pair of integers."""
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise ValueError(f"{path!r}: tensor {name!r} has malformed data_offsets {offsets!r}")
    return offsets[1]


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes ``tensors`` (numpy or JAX arrays) to ``path`` atomically (``atomic_write``: temp file + rename)."""
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

    def write(f):
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            if array.size == 0:
                continue
            # write in slices along axis 0 to keep peak memory low for big memory-mapped inputs
            array = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)
            for i in range(0, array.shape[0], 1024):
                f.write(np.ascontiguousarray(array[i:i + 1024]).tobytes())

    atomic_write(path, write, suffix=".safetensors")


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
