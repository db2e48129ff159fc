"""Tensors on the wire: safetensors (no code runs on load, unlike pickle or torch.load).

Several named groups of arrays share one safetensors blob, keyed `group/name`, so a message
carries, say, the global parameters and Scaffold's control variate in one bulk part.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors.numpy import save

from fedpod.wire.codec import Buffer, DecodeError

Arrays = dict[str, Any]


def encode_groups(groups: Mapping[str, Mapping[str, Any]]) -> bytes:
    """np.asarray, not np.ascontiguousarray: the latter turns a 0-d tensor (a BatchNorm counter)
    into shape (1,), which the model would then refuse to load."""
    flat = {f"{group}/{name}": np.asarray(value, order="C") for group, arrays in groups.items()
            for name, value in arrays.items()}
    return bytes(save(flat))


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
           "BOOL": np.bool_}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself applies


def decode_groups(data: Buffer) -> dict[str, Arrays]:
    """Arrays that are views into `data` (copied once first if it is read-only), so that a
    40 MB update costs no second 40 MB. The header is checked as strictly as safetensors does:
    known dtypes, sizes that match shapes, offsets inside the buffer that neither overlap
    nor leave gaps. safetensors' own loader is still what `encode_groups` pairs with on the
    writing side and what the tests compare this reader against."""
    buffer = memoryview(data if isinstance(data, bytearray) or _writable(data) else bytearray(data)).cast("B")
    try:
        flat = _parse(buffer)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise DecodeError(f"tensors do not decode: {exc}") from exc
    groups: dict[str, Arrays] = {}
    for key, value in flat.items():
        group, _, name = key.partition("/")
        if not name:
            raise DecodeError(f"tensor {key!r} has no group")
        groups.setdefault(group, {})[name] = value
    return groups


def _writable(data: Buffer) -> bool:
    return isinstance(data, memoryview) and not data.readonly


def _parse(buffer: memoryview) -> dict[str, np.ndarray]:
    if len(buffer) < 8:
        raise ValueError("shorter than the 8-byte header length")
    header_size = int.from_bytes(buffer[:8], "little")
    if header_size > min(MAX_HEADER_BYTES, len(buffer) - 8):
        raise ValueError(f"header length {header_size} does not fit in {len(buffer)} bytes")
    header = json.loads(bytes(buffer[8 : 8 + header_size]))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    body = buffer[8 + header_size :]
    spans: list[tuple[int, int, str]] = []
    arrays: dict[str, np.ndarray] = {}
    for key, entry in header.items():
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        shape = [int(n) for n in entry["shape"]]
        begin, end = (int(n) for n in entry["data_offsets"])
        if any(n < 0 for n in shape) or not 0 <= begin <= end <= len(body):
            raise ValueError(f"tensor {key!r} has a negative shape or offsets outside the data")
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {key!r}: {end - begin} bytes for shape {shape} of {entry['dtype']}")
        spans.append((begin, end, key))
        arrays[key] = np.frombuffer(body, dtype=dtype, count=count, offset=begin).reshape(shape)
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            raise ValueError(f"tensor {key!r} overlaps another or leaves a gap at byte {position}")
        position = end
    if position != len(body):
        raise ValueError(f"{len(body) - position} bytes after the last tensor")
    return arrays
