"""The model-based test of a whole poll (issue 11): generated mailboxes, destinations, faults and crashes.

``plan`` describes a case (what the mailbox holds, where mail goes, what goes wrong in which poll) and the hypothesis
strategies that generate cases; ``messages`` makes the messages and says which original a delivered copy is;
``destinations`` sets up the six destination kinds with their failure schedules; ``ledger`` knows what was sent
where and checks the invariants; ``runner`` runs the polls (in process, or in a forked child that SIGKILLs itself);
``imap_proxy`` stands between postbote and Dovecot for the IMAP destination's refusals, cuts and kill points.
"""
