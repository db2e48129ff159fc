"""What a party remembers of the answers it carried on acknowledgements (`fedpod.channel`):
enough to answer a resent request alike, never more than its bound in bytes or time; and how
many copies of a request still being handled wait for its answer, and for how long."""

from __future__ import annotations

import asyncio

import pytest

from fedpod import channel
from fedpod.channel import _AnswersGiven


def test_the_oldest_answers_go_first_beyond_the_byte_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "ANSWERS_KEPT_BYTES", 10)
    answers = _AnswersGiven()
    for index in range(3):
        answers.keep((b"k", bytes([index])), b"x" * 4)
    assert answers.get((b"k", b"\x00")) is None  # 12 bytes kept would be over 10
    assert answers.get((b"k", b"\x01")) == b"xxxx" and answers.get((b"k", b"\x02")) == b"xxxx"


def test_an_answer_is_forgotten_after_its_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(channel.time, "monotonic", lambda: now[0])
    answers = _AnswersGiven()
    answers.keep((b"k", b"old"), b"a")
    now[0] += channel.ANSWER_KEPT_S + 1
    assert answers.get((b"k", b"old")) is None
    answers.keep((b"k", b"new"), b"b")  # keeping a new one lets the expired ones go
    assert answers.get((b"k", b"new")) == b"b" and len(answers._kept) == 1


async def test_no_more_copies_wait_than_a_sender_sends_and_none_for_long(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "COPY_PATIENCE_S", 0.2)
    answers = _AnswersGiven()
    envelope = (b"k", b"handled")
    answers.begin(envelope)
    waiting = [asyncio.ensure_future(answers.for_copy(envelope)) for _ in range(channel.MAX_SENDS)]
    await asyncio.sleep(0)
    assert await answers.for_copy(envelope) is None  # one copy more than a sender sends: told what is known now
    assert await asyncio.gather(*waiting) == [None] * channel.MAX_SENDS  # the original took too long
    answers.settle(envelope, b"late")
    assert await answers.for_copy(envelope) == b"late"
