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


DICTIONARY_BATCH = 2  # Arrow's MessageHeader union: DictionaryBatch; its field 1 is a RecordBatch
RECORD_BATCH_COMPRESSION = 3  # RecordBatch's fields: length, nodes, buffers, compression


def table_to_bytes(table: pa.Table) -> bytes:
    import pyarrow as pa
    import pyarrow.ipc

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def table_from_bytes(data: Buffer) -> pa.Table:
    """A pod's answer. Pods never compress one (`table_to_bytes`), and a compressed stream is
    refused before it is read: 12 KB of zstd held 400 MB of zeros, so a pod's answer of a few
    megabytes could have asked the modeller for terabytes."""
    import pyarrow as pa
    import pyarrow.ipc

    try:
        buffer = pa.py_buffer(data)
        messages = pa.ipc.MessageReader.open_stream(buffer)
        while (message := _next_message(messages)) is not None:
            if message.type in ("record batch", "dictionary") and _compressed(message.metadata.to_pybytes()):
                raise DecodeError("result table is compressed, which pods never do: refused unread")
        return pa.ipc.open_stream(buffer).read_all()
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise DecodeError(f"result table does not decode: {exc}") from exc


def _next_message(reader: Any) -> Any:
    try:
        return reader.read_next_message()
    except StopIteration:
        return None


def _compressed(metadata: bytes) -> bool:
    """Whether an Arrow IPC message's flatbuffer (a RecordBatch, or a DictionaryBatch's) sets
    its `compression` field, read without decoding the body; malformed metadata counts as
    compressed (it would not decode anyway)."""

    def read(kind: str, position: int) -> int:  # struct reads negative positions from the end: not here
        if not 0 <= position <= len(metadata) - struct.calcsize(kind):
            raise struct.error("outside the metadata")
        return int(struct.unpack_from(kind, metadata, position)[0])

    def field(table: int, index: int) -> int | None:  # where field `index` of the table at `table` lies
        vtable = table - read("<i", table)
        if 4 + 2 * index + 2 > read("<H", vtable):
            return None
        offset = read("<H", vtable + 4 + 2 * index)
        return table + offset if offset else None

    def table_at(position: int) -> int:
        return position + read("<I", position)

    try:
        message = table_at(0)
        kind_at, header_at = field(message, 1), field(message, 2)
        if kind_at is None or header_at is None:
            return False
        header = table_at(header_at)
        if metadata[kind_at] == DICTIONARY_BATCH:
            data_at = field(header, 1)
            if data_at is None:
                return False
            header = table_at(data_at)
        return field(header, RECORD_BATCH_COMPRESSION) is not None
    except (struct.error, IndexError):
        return True
