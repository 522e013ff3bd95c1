# syntax=docker/dockerfile:1
# The worker's image: the locked runtime dependencies, the project, a non-root user.
FROM python:3.11-slim

# uv from its official image, pinned to the version the lock file was written with.
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /uvx /bin/

ENV PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /app

# Dependencies first: this layer is rebuilt only when the lock file changes. The runtime ones
# only: no dependency group (neither the dev tools nor the embedded PostgreSQL and Redis of
# `run`, about 50 MB the image never uses: compose gives it servers).
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-default-groups --no-install-project

COPY README.md alembic.ini ./
COPY alembic ./alembic
COPY worker ./worker
COPY tasks ./tasks
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-default-groups

# Run as a user that owns nothing in /app: the code and the environment are read-only to it.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/worker worker
USER worker
ENV PATH="/app/.venv/bin:$PATH"

# The worker node, as the compose `worker` service runs it (the same as `celery -A
# worker.celery_app worker -E`: pass that as the command to add any Celery worker option).
CMD ["python", "-m", "worker", "consume"]
