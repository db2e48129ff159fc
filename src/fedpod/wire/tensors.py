"""Tensors on the wire: safetensors (no code runs on load, unlike pickle or torch.load).

Several named groups of arrays share one safetensors blob, keyed `group/name`, so a message
carries, say, the global parameters and Scaffold's control variate in one bulk part. Neither
direction copies the arrays: encoding yields the header plus the arrays' own memory as parts,
decoding yields views into the received buffer.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpod.wire.codec import Buffer, DecodeError

Arrays = dict[str, Any]


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
           "BOOL": np.bool_}
_CODES = {np.dtype(dtype): code for code, dtype in _DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself applies


def encode_parts(groups: Mapping[str, Mapping[str, Any]]) -> list[Buffer]:
    """The safetensors encoding as parts — the header, then each array's own memory — so that
    a 40 MB model is sealed and sent without first being copied into one blob (safetensors'
    `save` makes that copy, and a second one on its way to Python bytes). Tests check that
    safetensors' own loader reads these bytes back exactly."""
    return encode_named({f"{group}/{name}": value for group, members in groups.items()
                         for name, value in members.items()})


def encode_named(tensors: Mapping[str, Any]) -> list[Buffer]:
    """`encode_parts` for tensors named without groups (a model file as others read it)."""
    arrays: list[np.ndarray] = []
    header: dict[str, Any] = {}
    offset = 0
    for key, value in tensors.items():
        array = np.asarray(value, order="C")  # not ascontiguousarray: it makes a 0-d tensor 1-d
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        code = _CODES.get(array.dtype.newbyteorder("="))
        if code is None:
            raise ValueError(f"tensor {key} has dtype {array.dtype}, which safetensors cannot carry")
        header[key] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return [len(text).to_bytes(8, "little") + text,
            *(array.reshape(-1).view(np.uint8).data for array in arrays if array.nbytes)]


def write_tensors(path: Path, parts: Sequence[Buffer]) -> None:
    """Write an encoding (`encode_parts`, `encode_named`) part by part — a 400 MB model is not
    joined into one blob first — to a partial file renamed into place, so that a process killed
    while writing leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as file:
        for part in parts:
            file.write(part)
    os.replace(partial, path)


def decode_groups(data: Buffer | Sequence[Buffer], *, movable: bool = False) -> dict[str, Arrays]:
    """Arrays that are views into `data` (copied once first if it is read-only), so that a
    40 MB update costs no second 40 MB. The header is checked as strictly as safetensors does:
    known dtypes, sizes that match shapes, offsets inside the buffer that neither overlap
    nor leave gaps; tests compare it with safetensors' own loader.

    `movable`: the caller gives up a writable `data`, whose tensors may then be moved within
    it to lie aligned in memory (`_aligned`), so that a plan can adopt them; `data` no longer
    decodes after that. A copy made here is always aligned."""
    owned = False
    if not isinstance(data, bytes | bytearray | memoryview):  # parts, from a message that never left this process
        data, owned = bytearray().join(data), True
    buffer = memoryview(data).cast("B")
    if buffer.readonly:  # plans may update parameters in place
        buffer, owned = memoryview(bytearray(buffer)), True
    try:
        flat = _parse(buffer, align=owned or movable)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise DecodeError(f"tensors do not decode: {exc}") from exc
    groups: dict[str, Arrays] = {}
    for key, value in flat.items():
        group, _, name = key.partition("/")
        if not name:
            raise DecodeError(f"tensor {key!r} has no group")
        groups.setdefault(group, {})[name] = value
    return groups


def _aligned(buffer: memoryview, start: int) -> memoryview:
    """The data part of a safetensors blob, `buffer[start:]`, moved back by up to 7 bytes over
    the header already parsed so that it starts 8-byte aligned in memory: a message's tensors lie
    at whatever offset its envelope put them, and a tensor over misaligned memory cannot be
    trained in place (the pod would copy a 400 MB model instead of adopting it)."""
    size = len(buffer) - start
    address = np.frombuffer(buffer, dtype=np.uint8).ctypes.data + start if len(buffer) else 0
    shift = address % 8
    if not shift or not size:
        return buffer[start:]
    ctypes.memmove(address - shift, address, size)  # overlapping: memmove, and no temporary copy
    return buffer[start - shift : start - shift + size]


def _parse(buffer: memoryview, *, align: bool) -> dict[str, np.ndarray]:
    if len(buffer) < 8:
        raise ValueError("shorter than the 8-byte header length")
    header_size = int.from_bytes(buffer[:8], "little")
    if header_size > min(MAX_HEADER_BYTES, len(buffer) - 8):
        raise ValueError(f"header length {header_size} does not fit in {len(buffer)} bytes")
    header = json.loads(bytes(buffer[8 : 8 + header_size]))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    body = _aligned(buffer, 8 + header_size) if align else buffer[8 + header_size :]
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
