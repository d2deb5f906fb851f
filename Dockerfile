# The project's image for the homelab: what `homelab twin images` builds for the twin from the
# same sources (infra/images.py), here from Debian's slim image. Kept in step by
# tests/test_twin_images.py: the same Debian packages (homelab_dagster/images.py BASE_PACKAGES),
# the same `uv sync` flags (UV_SYNC_FLAGS), the same environment (/app/.venv, Debian's Python).
#
#   docker build -t ghcr.io/homelab/homelab-dagster:0.1.0 .
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 ca-certificates libgomp1 libnuma1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON=/usr/bin/python3.11 \
    UV_PYTHON_DOWNLOADS=never \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PATH=/app/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
COPY homelab_dagster ./homelab_dagster
COPY assets ./assets
COPY resources ./resources
COPY sensors ./sensors
COPY infra ./infra
RUN --mount=type=cache,target=/root/.cache/uv uv sync --locked --no-dev --no-editable
CMD ["python3"]
