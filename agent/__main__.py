import sys

from postbote.cli import run_command

sys.exit(run_command())
