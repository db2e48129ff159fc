"""nats-py as the bus installs it (`fedpod.transport.nats_copies`): messages arrive whole and in
order however the socket splits them, commands go out byte for byte as nats-py's own, and the
transport reads in bounded chunks, lines included."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from typing import Any
from urllib.parse import urlparse

import nats.protocol.command
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.protocol.parser import Parser

import fedpod.transport.bus  # noqa: F401  (installs nats_copies)
from fedpod.transport.nats_copies import _ChunkTransport, _Stream

Received = tuple[bytes, bytes, bytes | None]


class _Client:
    def __init__(self) -> None:
        self.received: list[Received] = []

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, payload: bytes, headers: Any) -> None:
        self.received.append((subject, payload, headers))


def _parse(chunks: list[bytes]) -> list[Received]:
    client = _Client()
    parser = Parser(client)

    async def feed() -> None:
        for chunk in chunks:
            await parser.parse(chunk)

    asyncio.run(feed())
    return client.received


def _payload(size: int, seed: int) -> bytes:
    return (hashlib.sha256(seed.to_bytes(4, "big")).digest() * (size // 32 + 1))[:size]


def _frame(index: int, size: int, with_headers: bool) -> tuple[bytes, Received]:
    subject, payload = f"s.{index}".encode(), _payload(size, index)
    if not with_headers:
        return b"MSG %s %d %d\r\n" % (subject, index, size) + payload + b"\r\n", (subject, payload, None)
    headers = b"NATS/1.0\r\nFedpod-Chunk: %d\r\n\r\n" % index
    wire = (b"HMSG %s %d _INBOX.r %d %d\r\n" % (subject, index, len(headers), len(headers) + size)
            + headers + payload + b"\r\n")
    return wire, (subject, payload, headers)


@settings(max_examples=60, deadline=None)
@given(messages=st.lists(st.tuples(st.sampled_from([0, 1, 31, 4096, 70_000, 300_000]), st.booleans()),
                         min_size=1, max_size=6),
       cuts=st.lists(st.floats(min_value=0, max_value=1), max_size=12))
def test_messages_arrive_whole_and_in_order_however_the_socket_splits_them(
        messages: list[tuple[int, bool]], cuts: list[float]) -> None:
    frames = [_frame(i, size, headers) for i, (size, headers) in enumerate(messages)]
    wire = b"".join(frame for frame, _ in frames) + b"+OK\r\n"
    points = sorted({0, len(wire), *(int(cut * len(wire)) for cut in cuts)})
    chunks = [wire[a:b] for a, b in itertools.pairwise(points)]
    received = _parse(chunks)
    assert received == [expected for _, expected in frames]
    assert all(type(payload) is bytes for _, payload, _ in received)


def test_a_payload_ending_on_a_read_boundary_and_one_byte_reads_both_work() -> None:
    first, one = _frame(1, 70_000, True)
    second, two = _frame(2, 5, False)
    wire = first + second
    assert _parse([first, second]) == [one, two]
    assert _parse([wire[i:i + 1] for i in range(len(wire))]) == [one, two]


def test_the_parser_buffer_slices_once_into_bytes() -> None:
    parser = Parser(_Client())
    parser.buf.extend(b"0123456789")
    piece = parser.buf[2:5]
    assert type(piece) is bytes and bytes(piece) is piece and piece == b"234"
    assert parser.buf[3] == ord("3")


def test_commands_are_nats_wire_format_byte_for_byte() -> None:
    payload = memoryview(b"x" * 10)
    assert nats.protocol.command.pub_cmd("a.b", "", payload) == b"PUB a.b  10\r\n" + b"x" * 10 + b"\r\n"
    headers = bytearray(b"NATS/1.0\r\nk: v\r\n\r\n")
    assert nats.protocol.command.hpub_cmd("a.b", "_INBOX.1", headers, payload) == (
        b"HPUB a.b _INBOX.1 %d %d\r\n" % (len(headers), len(headers) + 10) + bytes(headers) + b"x" * 10 + b"\r\n")


async def _serve(send: Any) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(send, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"nats://127.0.0.1:{port}"


def test_the_transport_reads_lines_then_chunks_in_order() -> None:
    blob = _payload(3_000_000, 7)

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"INFO {}\r\nPO")  # a line split across writes, and bytes after it
        await writer.drain()
        writer.write(b"NG\r\n" + blob)
        await writer.drain()
        writer.close()

    async def scenario() -> tuple[bytes, bytes, bytes, bool, BaseException | None]:
        server, url = await _serve(send)
        async with server:
            transport = _ChunkTransport()
            await transport.connect(urlparse(url), 1024 * 1024, 5)
            info, pong = await transport.readline(), await transport.readline()
            parts = []
            while part := await transport.read(1024 * 1024):
                parts.append(part)
            ended = transport.at_eof()
            await transport.wait_closed()  # the peer left: the connection closes without our asking
            try:
                await transport.drain()
            except ConnectionError as exc:
                return info, pong, b"".join(parts), ended, exc
            return info, pong, b"".join(parts), ended, None

    info, pong, rest, ended, drain_error = asyncio.run(scenario())
    assert (info, pong) == (b"INFO {}\r\n", b"PONG\r\n")
    assert rest == blob
    assert ended
    assert isinstance(drain_error, ConnectionResetError)  # a writer learns the connection is gone


def test_the_transport_stops_reading_beyond_twice_its_limit_and_resumes() -> None:
    limit = 256 * 1024
    blob = _payload(16 * 1024 * 1024, 9)

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(blob)
        await writer.drain()
        writer.close()

    async def scenario() -> tuple[int, bool, bytes]:
        server, url = await _serve(send)
        async with server:
            transport = _ChunkTransport()
            await transport.connect(urlparse(url), limit, 5)
            stream = transport._stream
            assert isinstance(stream, _Stream) and stream.transport is not None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while stream.transport.is_reading() and loop.time() < deadline:
                await asyncio.sleep(0.001)
            held, paused = stream.unread, not stream.transport.is_reading()
            parts = []
            while part := await transport.read(limit):
                parts.append(part)
            transport.close()
            return held, paused, b"".join(parts)

    held, paused, received = asyncio.run(scenario())
    assert paused, "the socket was never paused"
    assert 2 * limit < held <= 2 * limit + 256 * 1024  # beyond twice the limit by at most one socket read
    assert received == blob
