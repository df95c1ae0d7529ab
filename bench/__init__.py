"""postbote's side-by-side benchmark against fetchmail, mpop(+msmtp) and getmail6(+msmtp).

Not part of the test suite and not packaged: run it with ``python bench/run.py --help``.
See ``bench/README.md`` for what each mode measures and ``docs/performance.md`` for results.
"""
