"""A POP3 session behind the `postbote.Mailbox` seam: pipelined RETRs streamed to the spool, deferred DELEs, QUIT.

RFC 1939 removes messages marked with DELE only when QUIT is answered (the UPDATE state), so `finish` is what
makes deletions final; `abort` closes the connection without QUIT, and the server keeps every message.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence

import structlog
from postbote import AccountError, Fetched, MailboxEntry, NotFetched, TooLarge
from postbote.plugins.pop3.client import MessageTooLarge, POP3Client, POP3ConnectionError, POP3Error

log = structlog.get_logger("postbote.pop3")
PIPELINE_WINDOW = 64  # RETRs in flight: enough to hide a 20 ms round trip behind small messages


class POP3Mailbox:
    def __init__(self, client: POP3Client, *, max_size: int | None, mechanism: str = "") -> None:
        self.client = client
        self.max_size = max_size
        self.mechanism = mechanism  # the auth choice the login used
        self._numbers: dict[int, MailboxEntry] = {}  # DELE sent, by message number

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
        return [MailboxEntry(entry.uid, entry.size, entry.number) for entry in self.client.listing()]

    def headers(self, entry: MailboxEntry) -> bytes | None:
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
            yield entry, self._retrieved(entry)

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
            # A -ERR to this RETR: the session is still in step, so only this message waits for the next poll.
            message.discard()
            return NotFetched(str(exc), facts=(("size", entry.size),))
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


def looks_truncated(received: int, listed: int) -> bool:
    """Far less data than LIST announced is a cut transfer, not the message (small differences are line-ending
    counting: some servers announce LF sizes and send CRLF)."""
    return received < listed * 0.9 - 64


def retrieve_limit(size: int, max_size: int | None) -> int:
    """The most data accepted for one message: a server sending far more than LIST said is not trusted."""
    generous = 2 * size + (1 << 20)
    return min(generous, max_size) if max_size else generous
