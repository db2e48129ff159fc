"""The bus hands nats-py's parser a buffer whose slices are already bytes: payloads arrive whole,
split across reads or not, and are copied once rather than twice."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.protocol.parser import Parser

import fedpod.transport.bus  # noqa: F401  (installs the buffer)


class _Client:
    def __init__(self) -> None:
        self.received: list[tuple[bytes, bytes, bytes | None]] = []

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, payload: bytes, headers: Any) -> None:
        self.received.append((subject, payload, headers))


def _parse(chunks: list[bytes]) -> list[tuple[bytes, bytes, bytes | None]]:
    client = _Client()
    parser = Parser(client)

    async def feed() -> None:
        for chunk in chunks:
            await parser.parse(chunk)

    asyncio.run(feed())
    return client.received


def test_payloads_split_across_reads_arrive_whole_and_as_bytes() -> None:
    payload = bytes(range(256)) * 4000
    header = b"NATS/1.0\r\nk: v\r\n\r\n"
    wire = (b"MSG a.b 1 " + str(len(payload)).encode() + b"\r\n" + payload + b"\r\n"
            + b"HMSG c.d 2 _INBOX.x " + f"{len(header)} {len(header) + 3}".encode() + b"\r\n"
            + header + b"xyz\r\n")
    chunks = [wire[i:i + 7777] for i in range(0, len(wire), 7777)]
    received = _parse(chunks)
    assert [(subject, type(body), body) for subject, body, _ in received] == [
        (b"a.b", bytes, payload), (b"c.d", bytes, b"xyz")]
    assert received[1][2] == header


def test_the_parser_buffer_is_the_single_copy_kind() -> None:
    parser = Parser(_Client())
    parser.buf.extend(b"0123456789")
    piece = parser.buf[2:5]
    assert type(piece) is bytes and bytes(piece) is piece and piece == b"234"
    assert parser.buf[3] == ord("3")
