"""An IMAP session behind the `postbote.Mailbox` seam: the configured folders listed, messages streamed to the spool
with pipelined UID FETCHes, and each folder's after-fetch action applied to exactly the delivered UIDs.

Entry uids name folder, UIDVALIDITY and UID (``INBOX;UIDVALIDITY=1700000000;UID=42``, RFC 5092 style), so the
poller's records are per folder and UIDVALIDITY: when a folder's UIDVALIDITY changes, every message in it is new
(the change is logged as ``imap.uidvalidity_changed``, each folder's last value being kept in a small table beside
the state database). With ``gmail: true`` the uid is Gmail's X-GM-MSGID and a message seen under several labels is
listed once.

After delivery (`finish`), per folder: ``delete`` flags the UIDs \\Deleted and removes exactly them with UID EXPUNGE
(UIDPLUS) -- never a bare EXPUNGE, which would also remove what other clients flagged; without UIDPLUS the messages
are moved to ``move_to`` (a Trash folder) with MOVE, or the account is refused when the session opens. ``move``
moves them, ``seen`` sets \\Seen, ``keep`` does nothing. Every SELECT after the listing checks that UIDVALIDITY is
still the one listed: UIDs of another generation are never acted on. `abort` closes the connection at once: nothing
is expunged, moved or flagged.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postbote import AccountError, Fetched, MailboxEntry, NotFetched, StateError, TooLarge, get_logger
from postbote.plugins.imap.client import (
    IMAPClient,
    IMAPConnectionError,
    IMAPError,
    LiteralTooLarge,
    SelectedFolder,
)
from postbote.plugins.imap.settings import AfterFetch, FolderRule, IMAPSettings

if TYPE_CHECKING:
    from postbote import KeyedTable

log = get_logger("postbote.imap")
PIPELINE_WINDOW = 64  # UID FETCHes in flight: enough to hide a 20 ms round trip behind small messages
FOLDER_TABLE = "imap_folders"  # state_dir/imap_folders.sqlite3: each folder's last UIDVALIDITY, per account
DELETED = "\\Deleted"
SEEN = "\\Seen"


class IMAPMailbox:
    """One logged-in session with the folders an account reads (see the module docstring)."""

    def __init__(self, client: IMAPClient, settings: IMAPSettings, *, max_size: int | None,
                 state_dir: Path | None, account: str) -> None:
        self.client = client
        self.settings = settings
        self.max_size = max_size
        self.state_dir = state_dir
        self.account = account
        self._rules: dict[str, FolderRule] = {}  # folder -> its rule, as resolved by the listing
        self._uidvalidity: dict[str, int] = {}  # folder -> UIDVALIDITY at the listing
        self._exists: dict[str, int] = {}  # folder -> messages in it at the listing
        self._selected: str | None = None
        self._actions: dict[str, list[MailboxEntry]] = {}  # folder -> entries whose after-fetch action is due
        self._folder_table: KeyedTable | None = None
        self._table_failed = False
        check_capabilities(client, settings)

    @property
    def deadline(self) -> float | None:
        return self.client.deadline

    @deadline.setter
    def deadline(self, value: float | None) -> None:
        self.client.deadline = value

    def facts(self) -> dict[str, object]:
        """What ``check --connect`` shows of the session: the login used, the server's capabilities, TLS."""
        return {"login": self.client.login_choice, "capabilities": " ".join(sorted(self.client.capabilities)),
                "tls": self.client.tls_facts()}

    # --- listing ---

    def listing(self) -> Sequence[MailboxEntry]:
        entries: list[MailboxEntry] = []
        gmail_seen: set[int] = set()
        for folder, rule in self.folders():
            selected = self._select(folder, listing=True)
            self._rules[folder] = rule
            if selected.exists == 0:
                log.debug("imap.folder", folder=folder, uidvalidity=selected.uidvalidity, messages=0)
                continue
            listed = self.client.listing(unseen_only=self.settings.unseen_only, gmail=self.settings.gmail)
            log.debug("imap.folder", folder=folder, uidvalidity=selected.uidvalidity, messages=len(listed))
            ours = self._listed_uids(folder, "expunging")  # flagged by a session of ours that broke
            for message in listed:
                if message.uid not in ours and any(flag.upper() == DELETED.upper() for flag in message.flags):
                    continue  # another client deleted it and will expunge it: not ours to fetch
                if self.settings.gmail and message.gm_msgid is not None:
                    if message.gm_msgid in gmail_seen:
                        continue  # the same message under another label
                    gmail_seen.add(message.gm_msgid)
                    uid = f"gmail;X-GM-MSGID={message.gm_msgid}"
                else:
                    uid = f"{folder};UIDVALIDITY={selected.uidvalidity};UID={message.uid}"
                unseen = rule.after_fetch is AfterFetch.SEEN and not any(flag.upper() == SEEN.upper()
                                                                         for flag in message.flags)
                entries.append(MailboxEntry(uid, message.size, (folder, message.uid), stays=rule.after_fetch.stays,
                                            action_due=unseen))
        self._note_uidvalidities()
        return entries

    def folders(self) -> list[tuple[str, FolderRule]]:
        return resolve_folders(self.client, self.settings)

    def _select(self, folder: str, *, listing: bool = False) -> SelectedFolder:
        """SELECT ``folder`` unless it is selected; after the listing, only with the UIDVALIDITY listed."""
        try:
            selected = self.client.select(folder)
        except IMAPError as exc:
            self._selected = None
            raise AccountError(f"cannot open folder {folder!r} on the server: {exc} (check folders: in the "
                               "config; LIST shows the server's folder names)") from None
        self._selected = folder
        if listing:
            note_uidnext(self.account, folder, selected.uidnext)  # what a watch opened after this poll compares
            self._uidvalidity[folder] = selected.uidvalidity
            self._exists[folder] = selected.exists
        elif selected.uidvalidity != self._uidvalidity.get(folder):
            raise AccountError(f"the UIDVALIDITY of folder {folder!r} changed during the poll "
                               f"({self._uidvalidity.get(folder)} -> {selected.uidvalidity}): nothing more is done "
                               "in it this poll; the next poll fetches its messages as new")
        return selected

    def _ensure_selected(self, folder: str) -> None:
        if self._selected != folder:
            self._select(folder)

    def _note_uidvalidities(self) -> None:
        """Log each folder whose UIDVALIDITY changed since the last poll, and remember the values now listed."""
        table = self._table()
        if table is None or not self._uidvalidity:
            return
        try:
            known = table.get_many(self.account, self._uidvalidity)
            for folder, value in self._uidvalidity.items():
                old = known.get(folder)
                if old is not None and old.value != value:
                    log.warning("imap.uidvalidity_changed", folder=folder, old=old.value, new=value,
                                reason=f"all {self._exists.get(folder, 0)} messages in this folder count as new")
                if old is None or old.value != value:
                    table.put(self.account, folder, value)
        except StateError as exc:
            log.warning("imap.folder_table_unavailable", error=str(exc))

    def _table(self) -> KeyedTable | None:
        """The account's folder table (``state_dir/imap_folders.sqlite3``), opened once per session; None when
        there is no state directory or it cannot be opened (then changes are not reported, nothing else)."""
        if self._folder_table is None and self.state_dir is not None and not self._table_failed:
            from postbote import KeyedTable

            try:
                self._folder_table = KeyedTable.open(self.state_dir, FOLDER_TABLE)
            except StateError as exc:
                self._table_failed = True
                log.warning("imap.folder_table_unavailable", error=str(exc),
                            reason="UIDVALIDITY changes are not reported this poll (records are per UIDVALIDITY)")
        return self._folder_table

    def _close_table(self) -> None:
        if self._folder_table is not None:
            self._folder_table.close()
            self._folder_table = None

    # --- reading ---

    def headers(self, entry: MailboxEntry) -> bytes | None:
        folder, uid = entry.ref
        self._ensure_selected(folder)
        return self.client.header_block(uid)

    def fetch(self, entries: Iterable[MailboxEntry], *, stop: Callable[[], bool]) -> Iterator[tuple[MailboxEntry,
                                                                                                     Fetched]]:
        waiting, in_flight = deque(entries), deque[MailboxEntry]()
        while waiting or in_flight:
            while waiting and len(in_flight) < PIPELINE_WINDOW and not stop():
                folder, uid = waiting[0].ref
                if folder != self._selected:
                    if in_flight:
                        break  # the answers of this folder are read before the next folder is selected
                    self._select(folder)
                entry = waiting.popleft()
                self.client.send_fetch(uid, limit=fetch_limit(entry.size, self.max_size))
                in_flight.append(entry)
            if stop():
                log.info("poll.stopping", not_fetched=len(waiting) + len(in_flight))
                return  # fetches already sent are read and discarded by `finish`
            entry = in_flight.popleft()
            yield entry, self._fetched(entry)

    def _fetched(self, entry: MailboxEntry) -> Fetched:
        from postbote import Message  # loaded once there is a message: an empty poll does without

        message = Message(entry.uid, entry.size)
        try:
            received = self.client.read_fetched(message.write)
        except LiteralTooLarge as exc:
            message.discard()
            return TooLarge(str(exc))
        except IMAPConnectionError:
            message.discard()
            raise
        except OSError as exc:
            message.discard()
            raise AccountError(f"cannot spool the message to a temporary file: {exc.strerror or exc} "
                               "(is the temporary directory full?)") from None
        except IMAPError as exc:
            # A NO to this UID FETCH: the session is still in step, so only this message waits for the next poll.
            message.discard()
            return NotFetched(str(exc), facts=(("size", entry.size),))
        if received is None:
            message.discard()
            return NotFetched("the message is gone from the server (expunged by another client)",
                              facts=(("size", entry.size),))
        message.close_writing()
        return message

    # --- after delivery ---

    def delete(self, entry: MailboxEntry) -> None:
        """Remember the entry; its folder's action is applied for all of them at once by `finish`."""
        folder, _ = entry.ref
        self._actions.setdefault(folder, []).append(entry)

    def finish(self) -> list[MailboxEntry]:
        """Apply each folder's after-fetch action to the entries asked for, LOGOUT; the entries confirmed."""
        self._drain()
        confirmed: list[MailboxEntry] = []
        for folder, entries in self._actions.items():
            rule = self._rules.get(folder) or FolderRule(folder, self.settings.after_fetch, self.settings.move_to)
            if rule.after_fetch is AfterFetch.KEEP:
                confirmed.extend(entries)
                continue
            uids = [uid for _, uid in (entry.ref for entry in entries)]
            try:
                self._ensure_selected(folder)
                self._apply(folder, rule, uids)
            except IMAPError as exc:
                # A NO or BAD: the session is still in step; the records make the next poll try again.
                log.warning("message.delete_refused", folder=folder, messages=len(uids), action=str(rule.after_fetch),
                            reply=str(exc), reason="recorded as handled; the action is tried again next poll")
                continue
            confirmed.extend(entries)
        self._close_table()
        try:
            self.client.logout()
        except IMAPConnectionError as exc:
            log.debug("imap.logout_failed", error=str(exc))  # what was confirmed before stays confirmed
        return confirmed

    def _apply(self, folder: str, rule: FolderRule, uids: list[int]) -> None:
        # UIDs this account flags \Deleted itself are remembered until expunged: with delete, and with a move that
        # the server can only do by COPY + \Deleted + UID EXPUNGE (no MOVE), so a session lost in between has them
        # listed and finished next poll instead of taken for another client's deletions.
        expunge = self.client.has("UIDPLUS") and (rule.after_fetch is AfterFetch.DELETE or (
            rule.after_fetch is AfterFetch.MOVE and not self.client.has("MOVE")))
        if expunge:
            self._note_uids(folder, "expunging", uids)
        # The client splits long UID sets over several commands, sent together.
        if rule.after_fetch is AfterFetch.SEEN:
            self.client.store_flags(uids, [SEEN])
        elif rule.after_fetch is AfterFetch.MOVE or not self.client.has("UIDPLUS"):
            assert rule.move_to is not None  # checked when the session opened
            copied = self._listed_uids(folder, "copied") if not self.client.has("MOVE") else set()
            if done := [uid for uid in uids if uid in copied]:  # copied by an earlier poll that broke after it
                self.client.store_flags(done, [DELETED])
                self.client.uid_expunge(done)
            if rest := [uid for uid in uids if uid not in copied]:
                self._move_noting_copies(folder, rest, rule.move_to)
            if copied:
                self._note_uids(folder, "copied", None)
        else:
            self.client.store_flags(uids, [DELETED])
            self.client.uid_expunge(uids)
        if expunge:
            self._note_uids(folder, "expunging", None)

    def _move_noting_copies(self, folder: str, uids: list[int], target: str) -> None:
        """Move; should a move by UID COPY fail after the copies, remember them, so that the next poll finishes the
        move (STORE, UID EXPUNGE) instead of copying the messages again."""
        try:
            self._move(uids, target)
        except (IMAPError, IMAPConnectionError):
            if confirmed := getattr(self.client, "copy_confirmed", None):
                self._note_uids(folder, "copied", list(confirmed))
            raise

    def _listed_uids(self, folder: str, what: str) -> set[int]:
        """The UIDs of ``folder`` (at its UIDVALIDITY listed now) noted as ``what``: ``expunging`` -- flagged
        \\Deleted by this account and not yet seen expunged (listed again so that the deletion is finished, not taken
        for another client's); ``copied`` -- copied into the move target by a move that broke before its end."""
        table = self._table()
        try:
            entry = table.get(f"{self.account}/{what}", f"{folder};{self._uidvalidity.get(folder)}") if table else None
        except StateError:
            return set()
        if entry is None or not isinstance(entry.value, list):
            return set()
        return {uid for uid in entry.value if isinstance(uid, int)}

    def _note_uids(self, folder: str, what: str, uids: list[int] | None) -> None:
        """Add ``uids`` to what ``folder`` has noted as ``what`` (None: forget them all)."""
        table = self._table()
        if table is None:
            return
        key = f"{folder};{self._uidvalidity.get(folder)}"
        try:
            if uids is None:
                table.delete(f"{self.account}/{what}", key)
            else:
                value: Any = sorted(set(uids) | self._listed_uids(folder, what))
                table.put(f"{self.account}/{what}", key, value)
        except StateError as exc:
            log.warning("imap.folder_table_unavailable", error=str(exc))

    def _move(self, uids: list[int], folder: str) -> None:
        try:
            self.client.move(uids, folder)
        except IMAPError as exc:
            if exc.code != "TRYCREATE":
                raise
            log.info("imap.folder_created", folder=folder, reason="the folder to move delivered messages into")
            self.client.create(folder)
            self.client.move(uids, folder)

    def _drain(self) -> None:
        """Read the answers to fetches sent ahead that nobody took (a stopped poll)."""
        while self.client.in_flight:
            self.client.read_fetched(lambda _: None)

    def abort(self) -> None:
        self._close_table()
        self.client.close()


def resolve_folders(client: IMAPClient, settings: IMAPSettings) -> list[tuple[str, FolderRule]]:
    """The folders to read, in the configured order, patterns resolved with LIST (folders that cannot be selected
    are skipped, and so are the folders messages are moved into: they would be fetched again)."""
    targets = {rule.move_to for rule in settings.folders if rule.move_to}
    found: dict[str, FolderRule] = {}
    for rule in settings.folders:
        if not rule.is_pattern:
            found.setdefault(rule.name, rule)
            continue
        for info in client.list_folders(rule.name):
            if {"\\NOSELECT", "\\NONEXISTENT"} & info.flags or info.name in targets:
                continue
            name = "INBOX" if info.name.upper() == "INBOX" else info.name  # a server may say "Inbox"
            found.setdefault(name, rule)  # a folder two patterns match follows the first
    return list(found.items())


_uidnext_lock = threading.Lock()
_uidnext: dict[tuple[str, str], int] = {}  # (account, folder) -> UIDNEXT its last poll saw


def note_uidnext(account: str, folder: str, uidnext: int | None) -> None:
    """Remember the UIDNEXT a poll saw in ``folder``: a watch opened after the poll compares it (`idle`)."""
    if uidnext is None:
        return
    with _uidnext_lock:
        _uidnext[(account, folder)] = uidnext


def uidnext_seen(account: str, folder: str) -> int | None:
    with _uidnext_lock:
        return _uidnext.get((account, folder))


def check_capabilities(client: IMAPClient, settings: IMAPSettings) -> None:
    """Refuse, before anything is fetched, an action the server cannot do safely."""
    for rule in settings.folders:
        if rule.after_fetch is AfterFetch.DELETE and not client.has("UIDPLUS") and (
                rule.move_to is None or not client.has("MOVE")):
            raise AccountError(
                f"folder {rule.name}: after_fetch: delete needs UIDPLUS (UID EXPUNGE of exactly the delivered "
                "messages), which this server does not offer; postbote never sends a bare EXPUNGE, which would "
                "also remove messages other clients marked \\Deleted. Set move_to: Trash (the server offers "
                f"{'MOVE' if client.has('MOVE') else 'no MOVE either, so that cannot work'}), or use after_fetch:"
                " seen or keep")
        if rule.after_fetch is AfterFetch.MOVE and not (client.has("MOVE") or client.has("UIDPLUS")):
            raise AccountError(f"folder {rule.name}: after_fetch: move needs MOVE or UIDPLUS, which this server "
                               "does not offer; use after_fetch: seen or keep")


def fetch_limit(size: int, max_size: int | None) -> int:
    """The largest literal accepted for a message: a server sending far more than RFC822.SIZE said is not trusted
    (generous: some servers, Exchange among them, announce an estimate)."""
    generous = 2 * size + (1 << 20)
    return min(generous, max_size) if max_size else generous
