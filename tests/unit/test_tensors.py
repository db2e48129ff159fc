"""Tensors on the wire: fedpod's zero-copy reader agrees with safetensors and refuses bad headers."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import load, load_file, save

from fedpod.security.digest import bulk_digest
from fedpod.wire.codec import DecodeError
from fedpod.wire.tensors import decode_groups, encode_named, encode_parts, write_tensors


def encode_groups(groups: dict[str, dict[str, np.ndarray]]) -> bytes:
    return b"".join(encode_parts(groups))


DTYPES = [np.float64, np.float32, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_]


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True),
                       st.sampled_from(DTYPES).flatmap(lambda dtype: hnp.arrays(dtype, hnp.array_shapes(
                           min_dims=0, max_dims=3, min_side=0, max_side=5))), min_size=1, max_size=5))
def test_both_directions_agree_with_safetensors(arrays: dict[str, np.ndarray]) -> None:
    ours_written = encode_groups({"params": arrays})
    theirs_written = save({f"params/{name}": value for name, value in arrays.items()})
    for read in (load(ours_written), {f"params/{k}": v for k, v in decode_groups(theirs_written)["params"].items()}):
        assert set(read) == {f"params/{name}" for name in arrays}
        for name, value in arrays.items():
            assert read[f"params/{name}"].dtype == value.dtype
            assert read[f"params/{name}"].shape == value.shape
            np.testing.assert_array_equal(read[f"params/{name}"], value)


def test_encoding_shares_the_arrays_memory() -> None:
    w = np.arange(1000, dtype=np.float32)
    header, body = encode_parts({"params": {"w": w}})
    assert np.shares_memory(np.frombuffer(body, dtype=np.float32), w)
    assert bulk_digest([header, body]) == bulk_digest(header + bytes(body))  # what the audit log records
    big_endian = np.arange(3, dtype=">i4")
    np.testing.assert_array_equal(load(encode_groups({"p": {"x": big_endian}}))["p/x"], big_endian)
    with pytest.raises(ValueError, match="complex128"):
        encode_parts({"p": {"z": np.zeros(2, dtype=np.complex128)}})


def test_arrays_are_writable_views_of_a_writable_buffer() -> None:
    buffer = bytearray(encode_groups({"params": {"w": np.arange(1000, dtype=np.float32)}}))
    w = decode_groups(buffer)["params"]["w"]
    assert np.shares_memory(w, np.frombuffer(buffer, dtype=np.uint8))
    w += 1  # plans may update parameters in place
    assert decode_groups(bytes(buffer))["params"]["w"][0] == 1
    from_bytes = decode_groups(bytes(buffer))["params"]["w"]
    assert from_bytes.flags.writeable


def header_and_body(entries: dict[str, dict[str, object]], body: bytes) -> bytes:
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header)) + header + body


@pytest.mark.parametrize(("blob", "reason"), [
    (b"", "shorter than"),
    (struct.pack("<Q", 10**12) + b"{}", "does not fit"),
    (header_and_body({"p/w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "outside"),
    (header_and_body({"p/w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "bytes for shape"),
    (header_and_body({"p/w": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "X9"),
    (header_and_body({"p/a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "p/b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlaps"),
    (header_and_body({"p/a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "gap"),
    (header_and_body({"p/a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "after the last"),
    (header_and_body({"p/a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "negative"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    (header_and_body({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "no group"),
])
def test_malformed_tensors_are_refused_with_the_reason(blob: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_groups(blob)


def test_every_truncation_of_a_valid_blob_is_refused() -> None:
    blob = save({"params/w": np.arange(6, dtype=np.float32), "params/b": np.ones(2, dtype=np.int64)})
    for length in range(len(blob)):
        with pytest.raises(DecodeError):
            decode_groups(blob[:length])


def test_a_movable_buffer_is_aligned_in_place_and_a_shared_one_is_left_as_it_was() -> None:
    """A message's tensors lie at whatever offset the envelope gave them; a pod that is given
    the buffer moves them (in place) to aligned memory, where a plan can adopt them."""
    w = np.arange(1000, dtype=np.float64)
    blob = encode_groups({"params": {"w": w, "b": np.ones(3, dtype=np.float32)}})
    for offset in range(8):
        backing = bytearray(offset + len(blob))
        backing[offset:] = blob
        view = memoryview(backing)[offset:]
        kept = decode_groups(view)["params"]["w"]
        np.testing.assert_array_equal(kept, w)
        assert np.shares_memory(kept, np.frombuffer(backing, dtype=np.uint8))
        moved = decode_groups(view, movable=True)["params"]
        np.testing.assert_array_equal(moved["w"], w)
        np.testing.assert_array_equal(moved["b"], np.ones(3))
        assert moved["w"].flags.aligned and moved["w"].ctypes.data % 8 == 0
        assert np.shares_memory(moved["w"], np.frombuffer(backing, dtype=np.uint8))  # moved, not copied


def test_a_model_file_is_written_part_by_part_and_safetensors_reads_it(tmp_path: Path) -> None:
    params = {"layer.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "layer.bias": np.zeros(3)}
    path = tmp_path / "model.safetensors"
    write_tensors(path, encode_named(params))
    read = load_file(str(path))
    assert set(read) == set(params)
    for name, value in params.items():
        np.testing.assert_array_equal(read[name], value)
    assert not list(tmp_path.glob("*.partial"))


def stream(table: object, compression: str | None = None) -> bytes:
    import pyarrow as pa
    import pyarrow.ipc

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def test_a_compressed_answer_table_is_refused_unread() -> None:
    """12 KB of zstd held 400 MB of zeros: a pod's answer of megabytes could ask the modeller for
    terabytes. fedpod's pods never compress, so the modeller reads no compressed stream."""
    import pyarrow as pa

    from fedpod.wire.codec import table_from_bytes, table_to_bytes

    table = pa.table({"n": pa.array(np.zeros(50_000, dtype=np.int64)),
                      "code": pa.array(["a", "b"] * 25_000).dictionary_encode()})
    assert table_from_bytes(table_to_bytes(table)).equals(table)
    for compression in ("zstd", "lz4"):
        blob = stream(table, compression)
        assert len(blob) < table.nbytes / 20
        with pytest.raises(DecodeError, match="compressed"):
            table_from_bytes(blob)
    plain = table_to_bytes(table)
    for cut in range(0, len(plain), max(1, len(plain) // 97)):  # truncated or corrupted: refused, never a crash
        for blob in (plain[:cut], plain[:cut] + bytes([plain[cut] ^ 0xFF]) + plain[cut + 1:]):
            with contextlib.suppress(DecodeError):
                table_from_bytes(blob)
