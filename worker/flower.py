"""`python -m worker.flower`: Flower for this worker, with every page behind its credentials.

Flower (2.2) serves `/metrics` (task names, worker host names, counts) and `/healthcheck`
to anyone, even with `--basic-auth`. Started from here, those two ask for the credentials
like every other page; anything else is Flower as `celery -A worker.celery_app flower`
runs it, with the same options (`--basic-auth` comes from FLOWER_BASIC_AUTH, which keeps the
password off the command line).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def require_credentials() -> None:
    """Put Flower's open handlers behind the authentication its other pages use."""
    from flower.views import monitor
    from tornado import web

    for handler in (monitor.Metrics, monitor.Healthcheck):
        if not getattr(handler.get, "__wrapped__", None):
            handler.get = web.authenticated(handler.get)


def main(argv: Sequence[str] | None = None) -> int:
    """Run Flower for `worker.celery_app` with `argv` as Flower's options."""
    from celery.bin.celery import main as celery_main

    require_credentials()
    sys.argv = ["celery", "-A", "worker.celery_app", "flower",
                *(sys.argv[1:] if argv is None else argv)]
    return int(celery_main() or 0)


if __name__ == "__main__":
    raise SystemExit(main())
