"""A deterministic mail corpus: the same seed always gives the same bytes.

Three shapes:

* ``small`` -- plain-text mail of 1-6 kB (8-bit UTF-8 lines, lines starting with a dot to exercise
  dot-stuffing), the bulk of what a mailbox holds;
* ``mixed`` -- mostly small mail, about a fifth with base64 attachments of 20-500 kB, a few of 1-3 MB,
  and one multi-MB (5-10 MB) message per 300;
* ``big`` -- one message carrying a single attachment of a given size (200 MB by default).

Messages are stored the way an MTA leaves them in a Maildir: LF line endings, a ``Return-Path:`` and a
``Received:`` field at the top.  Each carries a unique ``Message-ID: <bench.TAG.NNNNNN@corpus.postbote.test>``,
by which the verifier finds it again at the destination.
"""

from __future__ import annotations

import base64
import random
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

ID_DOMAIN = "corpus.postbote.test"
MESSAGE_ID = re.compile(rb"^Message-ID: (<bench\.[^>\s]+>)", re.MULTILINE | re.IGNORECASE)
RECIPIENT = "rcpt@bench.example.net"
_EPOCH = datetime(2024, 3, 1, 8, 0, tzinfo=timezone(timedelta(hours=1)))
_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "bar", "ton", "mel", "fra", "gen", "str")
_UMLAUT_WORDS = ("Grüße", "Übergabe", "Straße", "größer", "Äpfel", "schön", "naïve", "café", "Zoë")


@dataclass(frozen=True)
class CorpusMessage:
    """One message as stored on the server (LF line endings)."""

    message_id: bytes
    data: bytes


@dataclass(frozen=True)
class Corpus:
    """An ordered set of messages with unique Message-IDs."""

    name: str
    messages: tuple[CorpusMessage, ...]

    @property
    def total_bytes(self) -> int:
        return sum(len(message.data) for message in self.messages)

    def by_id(self) -> dict[bytes, CorpusMessage]:
        return {message.message_id: message for message in self.messages}

    def __len__(self) -> int:
        return len(self.messages)


class _Writer:
    """Builds messages from one seeded random generator."""

    def __init__(self, seed: int, tag: str) -> None:
        self.rng = random.Random(f"{seed}:{tag}")
        self.tag = tag
        self.vocabulary = [self._word() for _ in range(600)] + list(_UMLAUT_WORDS)

    def _word(self) -> str:
        return "".join(self.rng.choice(_SYLLABLES) for _ in range(self.rng.randint(1, 4)))

    def sentence(self, words: int) -> str:
        return " ".join(self.rng.choice(self.vocabulary) for _ in range(words))

    def text_body(self, size: int) -> str:
        """Roughly ``size`` bytes of wrapped text, with a few dot-leading lines and a signature."""
        lines: list[str] = []
        length = 0
        while length < size:
            line = self.sentence(self.rng.randint(4, 13))
            if self.rng.random() < 0.04:
                line = "." + line if self.rng.random() < 0.5 else "..." + line
            if self.rng.random() < 0.08:
                line = ""
            lines.append(line)
            length += len(line) + 1
        lines += ["", "-- ", self.sentence(3)]
        return "\n".join(lines) + "\n"

    def headers(self, index: int, content_type: str, extra: tuple[str, ...] = ()) -> str:
        sender = f"sender{self.rng.randint(1, 40)}@example.org"
        date = format_datetime(_EPOCH + timedelta(minutes=7 * index, seconds=self.rng.randint(0, 59)))
        queue_id = f"{self.rng.getrandbits(40):010X}"
        fields = [
            f"Return-Path: <{sender}>",
            f"Received: from mx.example.org (mx.example.org [192.0.2.25])\n\tby pop.example.net with ESMTPS id "
            f"{queue_id}\n\tfor <{RECIPIENT}>; {date}",
            f"Message-ID: <bench.{self.tag}.{index:06d}@{ID_DOMAIN}>",
            f"Date: {date}",
            f"From: {self.sentence(2).title()} <{sender}>",
            f"To: Bench Recipient <{RECIPIENT}>",
            f"Subject: {self.sentence(self.rng.randint(2, 8))}",
            "MIME-Version: 1.0",
            *extra,
            content_type,
        ]
        return "\n".join(fields) + "\n"

    def small(self, index: int, size: int | None = None) -> CorpusMessage:
        size = size if size is not None else int(min(6000, max(1000, self.rng.lognormvariate(7.8, 0.45))))
        head = self.headers(index, "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit")
        return self._message(index, head + "\n" + self.text_body(size))

    def with_attachment(self, index: int, attachment_size: int) -> CorpusMessage:
        boundary = f"=_bench_{self.rng.getrandbits(48):012x}"
        head = self.headers(index, f'Content-Type: multipart/mixed; boundary="{boundary}"')
        payload = base64.encodebytes(self.rng.randbytes(attachment_size)).decode("ascii")
        body = (
            "This is a multi-part message in MIME format.\n"
            f"--{boundary}\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
            f"{self.text_body(self.rng.randint(300, 2000))}\n"
            f"--{boundary}\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n"
            f'Content-Disposition: attachment; filename="data-{index}.bin"\n\n'
            f"{payload}\n--{boundary}--\n"
        )
        return self._message(index, head + "\n" + body)

    def _message(self, index: int, text: str) -> CorpusMessage:
        data = text.encode("utf-8")
        message_id = f"<bench.{self.tag}.{index:06d}@{ID_DOMAIN}>".encode("ascii")
        return CorpusMessage(message_id, data)


def small_corpus(count: int, seed: int = 1, tag: str = "s") -> Corpus:
    """``count`` small plain-text messages."""
    writer = _Writer(seed, tag)
    return Corpus(f"small-{tag}", tuple(writer.small(i) for i in range(count)))


def mixed_corpus(count: int, seed: int = 1, tag: str = "m") -> Corpus:
    """Mostly small messages, some with attachments, a few of several MB (see the module docstring)."""
    writer = _Writer(seed, tag)
    huge = {round((k + 0.5) * count / max(1, count // 300)) for k in range(max(1, count // 300))}
    messages = []
    for index in range(count):
        roll = writer.rng.random()
        if index in huge:
            messages.append(writer.with_attachment(index, writer.rng.randint(5 << 20, 10 << 20) * 3 // 4))
        elif roll < 0.03:
            messages.append(writer.with_attachment(index, writer.rng.randint(1 << 20, 3 << 20) * 3 // 4))
        elif roll < 0.20:
            messages.append(writer.with_attachment(index, writer.rng.randint(20_000, 500_000) * 3 // 4))
        else:
            messages.append(writer.small(index))
    return Corpus(f"mixed-{tag}", tuple(messages))


def big_corpus(size: int = 200 << 20, seed: int = 1, tag: str = "b") -> Corpus:
    """One message of about ``size`` bytes (a base64 attachment)."""
    writer = _Writer(seed, tag)
    return Corpus(f"big-{tag}", (writer.with_attachment(0, size * 57 // 77),))


def describe(corpus: Corpus) -> str:
    sizes = sorted(len(m.data) for m in corpus.messages)
    if not sizes:
        return f"{corpus.name}: empty"
    median = sizes[len(sizes) // 2]
    return (f"{corpus.name}: {len(sizes)} messages, {corpus.total_bytes / 1e6:.1f} MB, "
            f"median {median / 1e3:.1f} kB, largest {sizes[-1] / 1e6:.2f} MB")
