"""A POP3 session behind the `postbote.Mailbox` seam: pipelined RETRs streamed to the spool, deferred DELEs, QUIT.

RFC 1939 removes messages marked with DELE only when QUIT is answered (the UPDATE state), so `finish` is what
makes deletions final; `abort` closes the connection without QUIT, and the server keeps every message.

A server without UIDL gives its messages no lasting names, so the listing names them itself: by a digest of their
header block (``TOP n 0``), which a message keeps as long as it is on the server; a server without TOP either, and
only with ``keep: false``, by a digest of the whole message (read once more to name it). The poller's records and
deletions then work as with UIDs: a message delivered but not yet deleted is known again at the next poll.
"""

from __future__ import annotations

import hashlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence

from postbote import AccountError, Fetched, MailboxEntry, NotFetched, TooLarge, get_logger
from postbote.plugins.pop3.client import (
    MAX_HEADER_BLOCK,
    ListingEntry,
    MessageTooLarge,
    POP3Client,
    POP3ConnectionError,
    POP3Error,
)

log = get_logger("postbote.pop3")
PIPELINE_WINDOW = 64  # RETRs in flight: enough to hide a 20 ms round trip behind small messages
HEADERS_NAME = "headers:"  # a message named by the digest of its header block (a server without UIDL)
CONTENT_NAME = "message:"  # ... by the digest of the whole message (a server without UIDL and TOP)
NAME_DIGITS = 32  # hex digits of SHA-256 kept in a name: 128 bits


class POP3Mailbox:
    def __init__(self, client: POP3Client, *, max_size: int | None, mechanism: str = "", keep: bool = False) -> None:
        self.client = client
        self.max_size = max_size
        self.mechanism = mechanism  # the auth choice the login used
        self.keep = keep  # a server without UIDL and TOP can be read only with keep: false
        self._numbers: dict[int, MailboxEntry] = {}  # DELE sent, by message number
        self._header_blocks: dict[int, bytes] = {}  # read while naming messages by their content (no TOP)

    @property
    def deadline(self) -> float | None:
        return self.client.deadline

    @deadline.setter
    def deadline(self, value: float | None) -> None:
        self.client.deadline = value

    def facts(self) -> dict[str, object]:
        """What ``check --connect`` shows of the session: the login used, the server's capabilities, TLS."""
        return {"login": self.mechanism, "capabilities": " ".join(sorted(self.client.capabilities)),
                "tls": self.client.tls_facts()}

    def listing(self) -> Sequence[MailboxEntry]:
        listed = self.client.listing()
        if self.client.has_uidl:
            return [MailboxEntry(entry.uid, entry.size, entry.number) for entry in listed]
        log.debug("pop3.no_uidl", messages=len(listed), reason="the server has no UIDL: messages are named by a "
                  "digest of their headers")
        return self._named_by_digest(listed)

    def _named_by_digest(self, listed: Sequence[ListingEntry]) -> list[MailboxEntry]:
        """Names for the messages of a server without UIDL. Messages with the same header block (true copies,
        as a rule) are told apart by their order: ``#2``, ``#3``."""
        names = dict(self._header_names(listed))
        entries: list[MailboxEntry] = []
        seen: Counter[str] = Counter()
        for item in listed:
            name = names.get(item.number) or self._content_name(item)
            seen[name] += 1
            uid = name if seen[name] == 1 else f"{name}#{seen[name]}"
            entries.append(MailboxEntry(uid, item.size, item.number))
        return entries

    def _header_names(self, listed: Sequence[ListingEntry]) -> Iterator[tuple[int, str | None]]:
        """Each message's name from its ``TOP n 0`` header block (None where the server refused TOP), the TOPs
        pipelined: one round trip for a window of messages."""
        window = PIPELINE_WINDOW if self.client.pipelining else 1
        waiting, in_flight = deque(listed), deque[ListingEntry]()
        while waiting or in_flight:
            while waiting and len(in_flight) < window:
                item = waiting.popleft()
                self.client.send_top(item.number)
                in_flight.append(item)
            item = in_flight.popleft()
            headers = self.client.read_top()
            digest = None if headers is None else hashlib.sha256(header_block(headers)).hexdigest()
            yield item.number, None if digest is None else HEADERS_NAME + digest[:NAME_DIGITS]

    def _content_name(self, item: ListingEntry) -> str:
        """A message's name from a digest of all of it (a server without TOP either): read once more to name it,
        which only fetch-and-delete can afford."""
        if self.keep:
            raise AccountError(f"{self.client.host} has neither UIDL nor TOP, so a message it keeps cannot be told "
                               "from a new one without downloading every message at every poll; use keep: false "
                               "(each message is deleted once delivered), or a server with UIDL")
        content = hashlib.sha256()
        head = bytearray()

        def take(data: bytes) -> None:
            content.update(data)
            if len(head) < MAX_HEADER_BLOCK and b"\n\n" not in head.replace(b"\r", b""):
                head.extend(data[: MAX_HEADER_BLOCK - len(head)])

        self.client.send_retrieve(item.number, limit=retrieve_limit(item.size, None))
        self.client.read_retrieved(take)
        self._header_blocks[item.number] = header_block(bytes(head))
        return CONTENT_NAME + content.hexdigest()[:NAME_DIGITS]

    def headers(self, entry: MailboxEntry) -> bytes | None:
        if entry.ref in self._header_blocks:
            return self._header_blocks[entry.ref]
        return self.client.top_headers(entry.ref)

    def fetch(self, entries: Iterable[MailboxEntry], *, stop: Callable[[], bool]) -> Iterator[tuple[MailboxEntry,
                                                                                                     Fetched]]:
        window = PIPELINE_WINDOW if self.client.pipelining else 1
        waiting, in_flight = deque(entries), deque[MailboxEntry]()
        while waiting or in_flight:
            while waiting and len(in_flight) < window and not stop():
                entry = waiting.popleft()
                self.client.send_retrieve(entry.ref, limit=retrieve_limit(entry.size, self.max_size))
                in_flight.append(entry)
            if stop():
                log.info("poll.stopping", not_fetched=len(waiting) + len(in_flight))
                return  # messages already requested are read and discarded before QUIT
            entry = in_flight.popleft()
            fetched = self._retrieved(entry)
            if isinstance(fetched, _Refused):
                # Was it this RETR that was refused, or a reply out of turn? Find out before reading on; the
                # messages requested behind it are asked for again.
                verifier = in_flight[0] if in_flight else waiting[0] if waiting else entry
                self.client.confirm_in_step(verifier.ref, verifier.size)
                waiting.extendleft(reversed(in_flight))
                in_flight.clear()
            yield entry, fetched

    def _retrieved(self, entry: MailboxEntry) -> Fetched:
        from postbote import Message  # loaded once there is a message: an empty poll does without

        message = Message(entry.uid, entry.size)
        try:
            received = self.client.read_retrieved(message.write)
        except MessageTooLarge as exc:
            message.discard()
            return TooLarge(str(exc))
        except POP3ConnectionError:
            message.discard()
            raise
        except OSError as exc:
            message.discard()
            raise AccountError(f"cannot spool the message to a temporary file: {exc.strerror or exc} "
                               "(is the temporary directory full?)") from None
        except POP3Error as exc:
            # A -ERR to this RETR: only this message waits for the next poll, once `fetch` has made sure the
            # session is still in step.
            message.discard()
            return _Refused(str(exc), facts=(("size", entry.size),))
        message.close_writing()
        if looks_truncated(received, entry.size):
            message.discard()
            return NotFetched("the server sent far less than LIST announced; left on the server",
                              event="message.truncated", facts=(("size", entry.size), ("received", received)))
        return message

    def delete(self, entry: MailboxEntry) -> None:
        self.client.delete(entry.ref, wait=False)
        self._numbers[entry.ref] = entry

    def finish(self) -> list[MailboxEntry]:
        """QUIT; the entries whose DELE the server accepted, now removed."""
        self.client.quit()
        for number, reply in self.client.refused_deletions.items():
            log.warning("message.delete_refused", uid=self._numbers[number].uid if number in self._numbers else None,
                        reply=reply, reason="recorded as handled; deletion is tried again next poll")
        return [entry for number, entry in self._numbers.items() if number not in self.client.refused_deletions]

    def abort(self) -> None:
        self.client.close()


class _Refused(NotFetched):
    """The server answered a RETR with ``-ERR``."""


def header_block(data: bytes) -> bytes:
    """The header lines of a ``TOP n 0`` reply, carriage returns and the empty line that ends them left out: the
    same name whichever line ends the server uses."""
    text = data.replace(b"\r", b"")
    end = text.find(b"\n\n")
    return text[:end] if end != -1 else text.rstrip(b"\n")


def looks_truncated(received: int, listed: int) -> bool:
    """Far less data than LIST announced is a cut transfer, not the message (small differences are line-ending
    counting: some servers announce LF sizes and send CRLF)."""
    return received < listed * 0.9 - 64


def retrieve_limit(size: int, max_size: int | None) -> int:
    """The most data accepted for one message: a server sending far more than LIST said is not trusted."""
    generous = 2 * size + (1 << 20)
    return min(generous, max_size) if max_size else generous
