"""A small, validating reader for safetensors files (shards and sample tables).

The header is untrusted: its size is bounded, its JSON depth and integers are bounded, every
tensor's dtype, shape and byte range are checked against the file before anything is mapped.
Data is memory-mapped with numpy and handed out as zero-copy views or copied rows, so reading
a batch of rows costs one gather per tensor, not a Python call per row and tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype code -> (numpy dtype used to map the bytes, torch dtype they hold)
DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "BF16": (np.dtype(np.int16), torch.bfloat16),
    "F16": (np.dtype(np.float16), torch.float16),
    "F32": (np.dtype(np.float32), torch.float32),
    "F64": (np.dtype(np.float64), torch.float64),
    "F8_E4M3": (np.dtype(np.uint8), torch.float8_e4m3fn),
    "U8": (np.dtype(np.uint8), torch.uint8),
    "I16": (np.dtype(np.int16), torch.int16),
    "I32": (np.dtype(np.int32), torch.int32),
    "I64": (np.dtype(np.int64), torch.int64),
}


class SafetensorsError(ValueError):
    """The file is not a well-formed safetensors file; the message says what is wrong."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # byte offsets inside the data section
    stop: int


def parse_json_bounded(text: str | bytes, what: str):
    """json.loads that turns every way hostile JSON can fail (nesting 100k deep, 5000-digit
    numbers, bad UTF-8, NaN) into a ValueError with a short message."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, the int digit limit, NaN/Infinity
        raise ValueError(f"{what} is not valid JSON: {str(exc).splitlines()[0][:200]}") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed")


class SafetensorsFile:
    """Header of a safetensors file, checked; data mapped on first use."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise SafetensorsError("file is shorter than the 8-byte header length")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > min(size - 8, MAX_HEADER_BYTES):
                    raise SafetensorsError(f"header length {header_len} is beyond the file ({size} bytes)")
                raw = fh.read(header_len)
        except OSError as exc:
            raise SafetensorsError(f"cannot read: {exc.strerror or exc}") from None
        try:
            header = parse_json_bounded(raw, "header")
        except ValueError as exc:
            raise SafetensorsError(str(exc)) from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"header is a {type(header).__name__}, not an object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise SafetensorsError("__metadata__ must map strings to strings")
        self.metadata: dict[str, str] = meta
        self.file_size = size
        self.data_start = 8 + header_len
        data_len = size - self.data_start
        entries = {}
        for name, info in header.items():
            entries[name] = _entry(name, info, data_len)
        self.entries: dict[str, TensorEntry] = entries
        self._map: np.memmap | None = None

    def _data(self) -> np.ndarray:
        if self._map is None:
            if self.file_size > self.data_start:
                self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            else:
                self._map = np.zeros(self.data_start, np.uint8)  # type: ignore[assignment]
        return self._map

    def array(self, name: str) -> np.ndarray:
        """Zero-copy numpy view (bf16 as int16, float8 as uint8)."""
        e = self.entries[name]
        np_dtype = DTYPES[e.dtype][0]
        raw = self._data()[self.data_start + e.start : self.data_start + e.stop]
        return raw.view(np_dtype).reshape(e.shape)

    def tensor(self, name: str, index=None) -> torch.Tensor:
        """A torch copy of the tensor, or of `index` along its first axis (an int, a slice, or an
        array of rows): one gather, whatever the number of rows."""
        e = self.entries[name]
        arr = self.array(name)
        if index is None or isinstance(index, (int, slice)):
            part = np.array(arr if index is None else arr[index], copy=True)  # out of the read-only map
        else:
            part = arr[index]  # a gather is already a fresh array
        out = torch.from_numpy(np.ascontiguousarray(part))
        torch_dtype = DTYPES[e.dtype][1]
        return out.view(torch_dtype) if out.dtype != torch_dtype else out

    def close(self) -> None:
        self._map = None


def _entry(name: str, info, data_len: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise SafetensorsError(f"tensor {name!r}: entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(f"tensor {name!r}: dtype {dtype!r} is not one dinocache reads")
    if not (
        isinstance(shape, list)
        and len(shape) <= 8
        and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 40 for s in shape)
    ):
        raise SafetensorsError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise SafetensorsError(f"tensor {name!r}: data_offsets {offsets!r} is not a [start, stop] pair")
    start, stop = offsets
    itemsize = DTYPES[dtype][0].itemsize
    if not 0 <= start <= stop <= data_len:
        raise SafetensorsError(f"tensor {name!r}: bytes {start}..{stop} lie outside the file's {data_len} data bytes")
    if stop - start != math.prod(shape) * itemsize:
        raise SafetensorsError(f"tensor {name!r}: {stop - start} bytes do not hold a {dtype}{shape}")
    return TensorEntry(name, dtype, tuple(shape), start, stop)
