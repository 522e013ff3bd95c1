"""`python -m worker bench`: ceilings, a tutorial-style baseline and this worker, in one run.

The package is imported by `celery -A worker.bench.baseline_app` and by the command line (for
`bench`'s options), so only `plan` is imported here; the harness is imported when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from worker.bench import plan


def bench(
    json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object on stdout instead of tables.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Tiny sizes: a smoke test.")] = False,
    commands: Annotated[int | None, typer.Option(
        metavar="N", show_default=False,
        help=f"Commands per mix for this worker (the baseline gets N/5; default "
             f"{plan.FULL.commands:,}, quick {plan.QUICK.commands}).")] = None,
    soak: Annotated[int | None, typer.Option(
        metavar="N", show_default=False,
        help=f"Commands in the memory soak run (default {plan.FULL.soak:,}, quick "
             f"{plan.QUICK.soak:,}).")] = None,
    latency_seconds: Annotated[float | None, typer.Option(
        metavar="S", show_default=False,
        help="How long to publish at half the peak rate.")] = None,
    concurrency: Annotated[int, typer.Option(
        help="Processes of each consumer (default: the CPU count).", show_default=False)
    ] = plan.cores(),
    worker_command: Annotated[str, typer.Option(
        metavar="CMD", show_default=False,
        help="'node' (the worker node, as run and compose start it) or a command line with "
             "{python} {concurrency} {queue} placeholders (default: the node).")
    ] = plan.WORKER_COMMAND,
    database_url: Annotated[str | None, typer.Option(
        show_default=False,
        help="A PostgreSQL server to use (databases are created on it and dropped); "
             "default: a throwaway server.")] = None,
    broker_url: Annotated[str | None, typer.Option(
        show_default=False, help="A Redis to use; default: a throwaway server.")] = None,
    data_dir: Annotated[Path | None, typer.Option(
        show_default=False, help="Where throwaway servers keep data.")] = None,
    redis_aof: Annotated[bool, typer.Option(
        "--redis-aof",
        help="Give the throwaway Redis an append-only file (appendfsync everysec, as `run` "
             "has); default: no persistence, as this machine's Redis (see "
             "worker/bench/stack.py).")] = False,
    log_dir: Annotated[Path | None, typer.Option(
        show_default=False,
        help="Keep the consumers' logs here (default: a temporary directory, kept only when "
             "a phase fails).")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")
                           ] = False,
    skip_baseline: Annotated[bool, typer.Option(
        "--skip-baseline", help="Measure only this worker (no baseline ratios).")] = False,
) -> None:
    """Measure ceilings, a tutorial-style Celery worker and this worker on the same servers.

    PostgreSQL and hashing ceilings first, then the same command mixes through the baseline
    and through this worker, and the comparison (exit 1 when a phase failed).
    """
    from dataclasses import replace

    from worker.bench.runner import Options
    from worker.bench.runner import main as run_benchmark

    sizes = plan.sizes(quick, commands, soak)
    if latency_seconds is not None:
        sizes = replace(sizes, latency_seconds=latency_seconds)
    if sizes.commands < 20 or sizes.soak < 20:
        raise typer.BadParameter("--commands and --soak must be at least 20")
    raise typer.Exit(run_benchmark(Options(
        json=json, quick=quick, sizes=sizes, concurrency=max(1, concurrency),
        worker_command=worker_command, database_url=database_url, broker_url=broker_url,
        data_dir=data_dir, log_dir=log_dir, progress=not no_progress,
        skip_baseline=skip_baseline, redis_aof=redis_aof)))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line `argv`; the exit status (0: every phase ran)."""
    single = typer.Typer(add_completion=False, rich_markup_mode=None)
    single.command()(bench)
    status = typer.main.get_command(single).main(
        args=argv, prog_name="python -m worker bench", standalone_mode=False)
    return int(status or 0)  # the status of the typer.Exit that ends `bench`


__all__ = ["bench", "main"]
