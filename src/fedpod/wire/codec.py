"""Encoders for what crosses the wire. Nothing here can execute code on decode (no pickle).

A message is `u32 length | msgpack structure | bulk bytes`. Structures are msgpack of
pydantic models; a model may name one bulk field (`BULK`, e.g. a result table or model
weights) that travels after the structure, outside msgpack and pydantic, so that hundreds
of megabytes are never copied through a serialiser. Tables are Arrow IPC streams, which keep
DuckDB's column types (HUGEINT sums, decimals, dates) exactly.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

from fedpod.errors import FedpodError

if TYPE_CHECKING:  # pyarrow loads only with the first table: a pod that only trains never needs it
    import pyarrow as pa

Model = TypeVar("Model", bound=BaseModel)
Buffer = bytes | bytearray | memoryview
_LENGTH = struct.Struct(">I")


class DecodeError(FedpodError, ValueError):
    pass


def _bulk_field(model: type[BaseModel]) -> str | None:
    name: str | None = getattr(model, "BULK", None)
    return name


def pack(message: BaseModel) -> list[Buffer]:
    """Encode a message as parts (structure, then the bulk field uncopied, if any)."""
    bulk = _bulk_field(type(message))
    fields = message.model_dump(mode="python", by_alias=True, exclude={bulk} if bulk else None)
    structure: bytes = msgpack.packb(fields, use_bin_type=True)
    parts: list[Buffer] = [_LENGTH.pack(len(structure)) + structure]
    if bulk:
        value = getattr(message, bulk)
        parts.extend(value) if isinstance(value, list) else parts.append(value)  # a list: parts of one field
    return parts


def pack_bytes(message: BaseModel) -> bytes:
    return b"".join(bytes(part) for part in pack(message))


def unpack(data: Buffer, model: type[Model]) -> Model:
    """Decode and validate; the bulk field is a zero-copy view into `data`."""
    view = memoryview(data)
    try:
        (length,) = _LENGTH.unpack(view[: _LENGTH.size])
        end = _LENGTH.size + length
        if end > len(view):
            raise ValueError("structure length exceeds the payload")
        fields: Any = msgpack.unpackb(view[_LENGTH.size : end], raw=False)
        if not isinstance(fields, dict):
            raise ValueError("structure is not a map")
        bulk = _bulk_field(model)
        if bulk:
            fields[bulk] = view[end:]
        elif end != len(view):
            raise ValueError("unexpected bytes after the structure")
        return model.model_validate(fields)
    except (ValueError, ValidationError, struct.error, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as exc:
        raise DecodeError(f"payload is not a valid {model.__name__}: {exc}") from exc


def table_to_bytes(table: pa.Table) -> bytes:
    import pyarrow as pa
    import pyarrow.ipc

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def table_from_bytes(data: Buffer) -> pa.Table:
    import pyarrow as pa
    import pyarrow.ipc

    try:
        return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise DecodeError(f"result table does not decode: {exc}") from exc
