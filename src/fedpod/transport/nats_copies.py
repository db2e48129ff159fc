"""Fewer copies of every byte nats-py sends and receives; installed by `fedpod.transport.bus`.

nats-py (2.x, on Python 3.11's asyncio streams) copied each received byte five times between the
socket and a subscriber: into the stream reader's buffer (`feed_data`), twice on `read` (a
bytearray slice, then `bytes` of it), into the parser's buffer (`extend`, which also moves what
is left in it whenever it grows) and out of it. It copied each byte it sent up to five times:
twice building the command (`b"HPUB ..." + headers + payload + CRLF`), once joining the pending
commands (asyncio's `writelines`), once slicing off what the socket did not take at once and
once buffering that. A 10-pod round of a 40 MB model moves 800 MB through nats-py (the modeller
receives 400 MB and sends 40; each pod receives 40 and sends 40), on two cores already busy. Here:

- the socket's chunks are kept as they came and handed to the parser uncopied (`_Stream`,
  under nats-py's own client as its TCP transport, `_ChunkTransport`; TLS is asyncio's);
- the parser, once it waits for a payload, holds the chunks rather than growing its buffer with
  them, and joins the payload once when the last one arrives (`_parse`); control lines (MSG,
  PING, INFO, -ERR ...) are still nats-py's own parsing;
- a payload left in the parser's buffer is sliced out as `bytes` in one copy, not two
  (`_ParserBuffer`);
- a command is joined once, and written as views, so asyncio copies only what it must buffer.

That leaves one copy each way: 10 pods x 40 MB 1.36 against 1.47 s a round (medians of three
runs of 16 rounds, alternating). What a stranger can make us hold is unchanged: a payload is at
most the server's `max_payload`, and reading stops beyond `2 * READ_BYTES` unread.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any
from urllib.parse import ParseResult

import nats.aio.client
import nats.aio.transport
import nats.protocol.command
from nats.protocol.parser import _CRLF_ as CRLF
from nats.protocol.parser import AWAITING_CONTROL_LINE, AWAITING_MSG_PAYLOAD, CRLF_SIZE, Parser

# The client hands its transport this as the buffer size on each connect; `_Stream` stops reading
# the socket beyond twice as much unread. nats-py's 32 KiB default paused and resumed the socket
# for every 1 MiB chunk (10 pods x 40 MB: 1.64 against 1.69 s a round, medians of 4 runs).
READ_BYTES = 1024 * 1024

Buffer = bytes | bytearray | memoryview


class _ParserBuffer(bytearray):
    """nats-py's parser takes a payload as `bytes(self.buf[start:stop])`: a bytearray slice, then
    a copy of that. A slice of this buffer is already `bytes` (which `bytes()` returns as it is),
    made once from a view. It also holds the chunks of a payload still arriving (`held`)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[bytes] = []
        self.held_bytes = 0

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            with memoryview(self) as view:
                return bytes(view[key])
        return super().__getitem__(key)


def _split(parts: list[Buffer], header_bytes: int, total: int) -> tuple[bytes, bytes]:
    """Bytes [0, header_bytes) and [header_bytes, total) of `parts` as if joined, each joined once."""
    head: list[Buffer] = []
    body: list[Buffer] = []
    start = 0
    for part in parts:
        stop = start + len(part)
        if start < header_bytes:
            head.append(part[: header_bytes - start])
        if stop > header_bytes and start < total:
            body.append(part[max(0, header_bytes - start) : total - start])
        start = stop
    return b"".join(head), b"".join(body)


_nats_parse = Parser.parse
_nats_reset = Parser.reset


def _reset(parser: Parser) -> None:
    _nats_reset(parser)
    parser.buf = _ParserBuffer()


async def _parse(parser: Parser, data: bytes = b"") -> None:
    """nats-py's `parse`, except while a payload is still arriving: its chunks are held, and the
    payload (and its headers) joined once from them when it is complete."""
    buf = parser.buf
    if parser.state != AWAITING_MSG_PAYLOAD or not data or not isinstance(buf, _ParserBuffer):
        await _nats_parse(parser, data)
        return
    wanted = parser.needed + CRLF_SIZE  # the payload and the CRLF that ends it
    have = len(buf) + buf.held_bytes
    if have + len(data) < wanted:
        buf.held.append(data)
        buf.held_bytes += len(data)
        return
    take = wanted - have
    args, had_headers = parser.msg_arg, parser.header_needed > 0
    with memoryview(buf) as start, memoryview(data) as arrived:
        headers, payload = _split([start, *buf.held, arrived[:take]], parser.header_needed, parser.needed)
        parser.buf = _ParserBuffer()
        parser.buf.extend(arrived[take:])  # what follows: the next control line, perhaps more
    parser.state, parser.header_needed = AWAITING_CONTROL_LINE, 0
    await parser.nc._process_msg(args["sid"], args["subject"], args["reply"], payload,
                                 headers if had_headers else None)
    await _nats_parse(parser, b"")


class _Stream(asyncio.Protocol):
    """A TCP connection's bytes as the socket gave them, read one chunk at a time and uncopied;
    reading stops beyond `2 * limit` unread bytes and resumes at `limit`, as a stream reader's."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.transport: asyncio.Transport | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._reading_paused = False
        self._eof = False
        self._lost: Exception | None = None  # why the connection ended, once it has
        self._arrived: asyncio.Future[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._queued += len(data)
        self._wake()
        if self._queued > 2 * self.limit and not self._reading_paused and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True

    def eof_received(self) -> None:
        self._eof = True
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost = exc or ConnectionResetError("connection lost")
        self._wake()
        self._writable.set()  # a writer waiting to drain learns of it
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self.transport.resume_reading()
            self._reading_paused = False

    def _wake(self) -> None:
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)

    async def _more(self) -> None:
        """Wait for the next chunk (or the end); reading is resumed first if it was paused."""
        self._resume_reading()
        self._arrived = asyncio.get_running_loop().create_future()
        try:
            await self._arrived
        finally:
            self._arrived = None

    async def read(self) -> bytes:
        """The next chunk received; b"" at the end."""
        while not self._chunks:
            if self._eof:
                return b""
            await self._more()
        chunk = self._chunks.popleft()
        self._queued -= len(chunk)
        if self._queued <= self.limit:
            self._resume_reading()
        return chunk

    async def readline(self) -> bytes:
        """Bytes up to and with the next newline (the client's connect handshake reads lines)."""
        while True:
            joined = b"".join(self._chunks)
            end = joined.find(b"\n") + 1
            if end or self._eof:
                line, rest = (joined[:end], joined[end:]) if end else (joined, b"")
                self._chunks = collections.deque([rest] if rest else [])
                self._queued = len(rest)
                return line
            if len(joined) > self.limit:
                raise ValueError(f"no line end in the first {len(joined)} bytes from the server")
            self._chunks = collections.deque([joined])
            await self._more()

    async def drain(self) -> None:
        await self._writable.wait()
        if self._lost is not None:
            raise self._lost

    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    @property
    def unread(self) -> int:
        """Bytes received and not read yet."""
        return self._queued

    async def wait_closed(self) -> None:
        await self._closed


class _ChunkTransport(nats.aio.transport.Transport):
    """nats-py's transport over TCP (and TLS, when a server asks for it) on a `_Stream`."""

    def __init__(self) -> None:
        self._stream: _Stream | None = None

    async def connect(self, uri: ParseResult, buffer_size: int, connect_timeout: int) -> None:
        stream = _Stream(buffer_size)
        await asyncio.wait_for(asyncio.get_running_loop().create_connection(
            lambda: stream, uri.hostname or "localhost", uri.port or 4222), connect_timeout)
        self._stream = stream

    async def connect_tls(self, uri: str | ParseResult, ssl_context: ssl.SSLContext, buffer_size: int,
                          connect_timeout: int) -> None:
        stream = self._connected()
        upgraded = await asyncio.wait_for(asyncio.get_running_loop().start_tls(
            self._socket(), stream, ssl_context,
            server_hostname=uri if isinstance(uri, str) else uri.hostname), connect_timeout)
        assert isinstance(upgraded, asyncio.Transport)
        stream.transport = upgraded

    def _connected(self) -> _Stream:
        if self._stream is None or self._stream.transport is None:
            raise ConnectionError("nats transport used before it connected")
        return self._stream

    def _socket(self) -> asyncio.Transport:
        transport = self._connected().transport
        assert transport is not None  # `_connected` checked it
        return transport

    def write(self, payload: bytes) -> None:
        self._socket().write(payload)

    def writelines(self, payload: list[bytes]) -> None:
        """Each piece written as a view: asyncio's `writelines` joins them first, and its `write`
        copies what the socket did not take at once (a slice of bytes) before buffering it."""
        transport = self._socket()
        for piece in payload:
            transport.write(memoryview(piece))

    async def read(self, buffer_size: int) -> bytes:
        return await self._connected().read()

    async def readline(self) -> bytes:
        return await self._connected().readline()

    async def drain(self) -> None:
        await self._connected().drain()

    async def wait_closed(self) -> None:
        if self._stream is not None:
            await self._stream.wait_closed()

    def close(self) -> None:
        if self._stream is not None and self._stream.transport is not None:
            self._stream.transport.close()

    def at_eof(self) -> bool:
        return self._stream is None or self._stream.at_eof()

    def __bool__(self) -> bool:
        return self._stream is not None and self._stream.transport is not None


def _pub_cmd(subject: str, reply: str, payload: Buffer) -> bytes:
    return b"".join((f"PUB {subject} {reply} {len(payload)}\r\n".encode(), payload, CRLF))


def _hpub_cmd(subject: str, reply: str, hdr: Buffer, payload: Buffer) -> bytes:
    return b"".join((f"HPUB {subject} {reply} {len(hdr)} {len(hdr) + len(payload)}\r\n".encode(),
                     hdr, payload, CRLF))


def install() -> None:
    """Patch nats-py in this process (idempotent): its read size, transport and parser."""
    nats.aio.client.DEFAULT_BUFFER_SIZE = READ_BYTES
    nats.protocol.command.pub_cmd = _pub_cmd
    nats.protocol.command.hpub_cmd = _hpub_cmd
    nats.aio.client.TcpTransport = _ChunkTransport  # type: ignore[attr-defined, assignment]
    Parser.reset = _reset  # type: ignore[method-assign, assignment]
    Parser.parse = _parse  # type: ignore[method-assign, assignment]
