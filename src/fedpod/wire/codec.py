"""Encoders for what crosses the wire. Nothing here can execute code on decode (no pickle).

Structures are msgpack of pydantic models; tables are Arrow IPC streams, which keep DuckDB's
column types (HUGEINT sums, decimals, dates) exactly.
"""

from __future__ import annotations

from typing import TypeVar

import msgpack
import pyarrow as pa
import pyarrow.ipc
from pydantic import BaseModel, ValidationError

from fedpod.errors import FedpodError

Model = TypeVar("Model", bound=BaseModel)


class DecodeError(FedpodError, ValueError):
    pass


def pack(model: BaseModel) -> bytes:
    packed: bytes = msgpack.packb(model.model_dump(mode="python", by_alias=True), use_bin_type=True)
    return packed


def unpack(data: bytes | bytearray, model: type[Model]) -> Model:
    try:
        return model.model_validate(msgpack.unpackb(data, raw=False))
    except (ValueError, ValidationError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise DecodeError(f"payload is not a valid {model.__name__}: {exc}") from exc


def table_to_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def table_from_bytes(data: bytes) -> pa.Table:
    try:
        return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise DecodeError(f"result table does not decode: {exc}") from exc
