# The project's image for the homelab: what `homelab twin images` builds for the twin from the
# same sources (infra/images.py), here from Debian's slim image. Kept in step by
# tests/test_twin_images.py: the same Debian packages (homelab_dagster/images.py BASE_PACKAGES),
# the same `uv sync` flags (UV_SYNC_FLAGS), the same environment (/app/.venv, Debian's Python).
#
#   docker build -t ghcr.io/homelab/homelab-dagster:0.1.0 .
#   docker build --build-arg UV_EXTRAS=--extra=ml -t ghcr.io/homelab/homelab-training:0.1.0 .
#
# The second is the training pods' image (IMAGES["homelab-training"]): the same project with the
# `ml` extra (torch, transformers, peft), from the same lock file.
#
# Only the homelab's image holds the Pulumi CLI, its Kubernetes provider and git: on the twin,
# step pods mount the toolchain (infra/toolchain.py) and the daemon (with the Git sensor) is
# the host's. The provider goes on PATH, where Pulumi finds it (PULUMI_HOME is the state's, and
# plugins are never downloaded at run time); both at the versions of infra/tools/versions.toml.
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM pulumi/pulumi-base:3.274.1 AS pulumi
RUN PULUMI_HOME=/tmp/pulumi /pulumi/bin/pulumi plugin install resource kubernetes v4.25.0 \
    && cp /tmp/pulumi/plugins/resource-kubernetes-v4.25.0/pulumi-resource-kubernetes /pulumi/bin/

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 ca-certificates libgomp1 libnuma1 \
    && rm -rf /var/lib/apt/lists/*
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
COPY --from=pulumi /pulumi/bin/pulumi /pulumi/bin/pulumi-resource-kubernetes /usr/local/bin/
ENV UV_PYTHON=/usr/bin/python3.11 \
    UV_PYTHON_DOWNLOADS=never \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PATH=/app/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
WORKDIR /app
ARG UV_EXTRAS=""
# The dependencies first, from the lock alone: a change to the sources rebuilds (and a node
# pulls) only the project's layer below, not the gigabytes of torch above it.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-editable ${UV_EXTRAS} --no-install-project
COPY README.md ./
COPY homelab_dagster ./homelab_dagster
COPY assets ./assets
COPY resources ./resources
COPY sensors ./sensors
COPY infra ./infra
RUN --mount=type=cache,target=/root/.cache/uv uv sync --locked --no-dev --no-editable ${UV_EXTRAS}
CMD ["python3"]
