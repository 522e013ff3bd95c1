"""`python -m worker bench`: ceilings, a tutorial-style baseline and this worker, in one run.

The package is imported by `celery -A worker.bench.baseline_app`, so `main` imports the
harness only when it is called.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line `argv`; the exit status (0: every phase ran)."""
    from worker.bench.runner import main as run_benchmark

    return run_benchmark(argv)


__all__ = ["main"]
