"""Delivery into an IMAP mailbox by APPEND: ``deliver: {imap: {...}}`` (being built: issue 13)."""
