"""`python -m worker`: the command line (worker/cli.py)."""

from worker.cli import main

main()
