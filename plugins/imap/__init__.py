"""The IMAP source: ``protocol: imap`` (being built: issue 13)."""

SOURCE_PROTOCOLS: tuple[str, ...] = ()
