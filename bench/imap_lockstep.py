"""The baseline of ``bench/imap.py append``: POP3 -> IMAP the way a one-off script does it, with the standard library.

    python3 bench/imap_lockstep.py HOST POP3_PORT IMAP_PORT POP3_USER IMAP_USER PASSWORD [--nodelay]

For each message in turn: RETR it (poplib), APPEND it to INBOX (imaplib: the command, the server's "+" continuation,
the literal, the tagged OK -- two round trips, nothing pipelined), and DELE it once the APPEND is OK; QUIT at the
end. Stdlib only, so that it runs under /usr/bin/python3 as the benchmark's unprivileged user.

imaplib writes the literal and its final CRLF in two ``send`` calls; with Nagle's algorithm on (the default) the CRLF
waits for the server's ACK of the literal, which a server's delayed ACK holds back (up to 40 ms on Linux).
``--nodelay`` sets TCP_NODELAY on imaplib's socket: the lock-step loop at its best, two round trips per message.
"""

from __future__ import annotations

import imaplib
import poplib
import socket
import sys


def main(argv: list[str]) -> int:
    nodelay = "--nodelay" in argv
    host, pop3_port, imap_port, pop3_user, imap_user, password = [arg for arg in argv if arg != "--nodelay"]
    pop = poplib.POP3(host, int(pop3_port), timeout=300)
    pop.user(pop3_user)
    pop.pass_(password)
    imap = imaplib.IMAP4(host, int(imap_port), timeout=300)
    if nodelay:
        imap.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    imap.login(imap_user, password)
    count, _ = pop.stat()
    for number in range(1, count + 1):
        _, lines, _ = pop.retr(number)
        status, answer = imap.append("INBOX", None, None, b"\r\n".join(lines) + b"\r\n")
        if status != "OK":
            print(f"APPEND of message {number} refused: {answer!r}", file=sys.stderr)
            return 1
        pop.dele(number)
    imap.logout()
    pop.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
