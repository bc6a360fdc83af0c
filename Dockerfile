# syntax=docker/dockerfile:1.7
#
# One image for every role: `actprompt serve` (api), `actprompt worker` (training), `actprompt db upgrade`
# (the one-shot migration). The role is the command; see docker-compose.yml.
#
# NOT BUILT HERE: the development machine has only the Docker client, no engine. tests/workers/test_compose.py
# parses this file (stages, build args, entrypoint) and checks that every command compose runs is a real
# `actprompt` sub-command; a first real `docker build` is still owed.
#
# Build:
#   CPU  (api, CPU workers):  docker build -t actprompt:cpu .
#   CUDA (GPU workers):       docker build -t actprompt:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
# The CUDA wheels carry their own CUDA runtime (nvidia-* wheels), so the base stays python:slim; the host only
# needs the NVIDIA driver and the container toolkit (compose asks for the GPU with a device reservation).

ARG PYTHON_VERSION=3.11

# ---- builder: a virtual environment with torch from the chosen wheel index, then the project --------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS builder
# Which torch build goes in: the CPU index (small, default) or a CUDA one (cu130 pairs with torch 2.14.1).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# torch first, from its own index, so that `pip install .` finds the pin satisfied and never pulls the default
# (CUDA, several GB) wheel from PyPI into a CPU image. This layer is cached across code changes.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
COPY client ./client
RUN pip install ./client
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
# A regular (non-editable) install; the Alembic scripts go where `service.db.migrate.MIGRATIONS_DIR` looks
# for them (beside the installed package; `cd /` so that the import is the installed copy, not ./service),
# so `actprompt db upgrade` works from any directory.
RUN pip install . \
 && target="$(cd / && python -c 'import service.db.migrate as m; print(m.MIGRATIONS_DIR)')" \
 && { [ -f "$target/env.py" ] || cp -r migrations "$target"; } \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

# ---- runtime: the venv (project + migrations), an unprivileged user --------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ACTPROMPT_DATA_ROOTS=/data
RUN useradd --create-home --uid 10001 actprompt && mkdir -p /data /app/var /files && chown actprompt /app/var /files
ENV ACTPROMPT_VAR_DIR=/app/var
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
USER actprompt
EXPOSE 8000
ENTRYPOINT ["actprompt"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
