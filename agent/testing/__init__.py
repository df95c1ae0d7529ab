"""postbote's testing kit: what tests, the demo and plugin authors use to run postbote against scripted servers.

``postbote.testing.pop3server`` is a small scriptable POP3 server (faults on demand: drops, stalls, stray lines,
floods). It lives here, not in the core, so that the core's public names hold no fault machinery.
"""
