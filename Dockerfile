# syntax=docker/dockerfile:1.7
#
# SynthMRI images, one Dockerfile, three targets:
#   docker build --target api    -t synthmri-api .     slim Python, FastAPI, no torch, no CUDA
#   docker build --target worker -t synthmri-worker .  CUDA runtime + CUDA build of torch + Celery worker
#   docker build --target train  -t synthmri-train .   the worker image with torchrun as entrypoint
# docker-compose.yml builds and wires them; see README.md "Deploying with Docker".

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------
# api: the HTTP front end. It validates requests, writes job records to Redis and
# serves result files; it never imports torch, so its image stays small.
FROM ${PYTHON_IMAGE} AS api
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SYNTHMRI_MODELS_DIR=/models \
    SYNTHMRI_RESULTS_DIR=/results
RUN useradd --create-home --uid 10001 synthmri \
    && mkdir -p /models /results && chown synthmri /models /results
WORKDIR /app
COPY requirements/api.txt requirements/api.txt
RUN pip install -r requirements/api.txt
COPY pyproject.toml README.md ./
COPY synthmri/ synthmri/
COPY model/ model/
COPY training/ training/
COPY worker/ worker/
COPY api/ api/
# The shipped demo model: Docker fills a new, empty `models` volume from here.
COPY --chown=synthmri models/ /models/
# --no-deps: the torch-free requirements above are all the API needs; pyproject.toml
# also lists torch for the worker, which must not land in this image.
RUN pip install --no-deps . \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && python -c "import api.main"
USER synthmri
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# Keep-alive longer than clients' and proxies' idle timeouts: no request lands on a closing connection.
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", "--timeout-keep-alive", "75"]

# ---------------------------------------------------------------------------
# worker: Celery worker(s) that sample on the GPU. One process per visible GPU
# (docker/worker-entrypoint.sh), each with concurrency 1 and prefetch 1.
FROM ${CUDA_IMAGE} AS worker
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    SYNTHMRI_MODELS_DIR=/models \
    SYNTHMRI_RESULTS_DIR=/results \
    SYNTHMRI_DEVICE=cuda
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 synthmri \
    && mkdir -p /models /results /data && chown synthmri /models /results
# The CUDA wheel first, from PyTorch's index; the project install below then finds
# torch already satisfied (constraints.txt pins the same version, local tag ignored).
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY synthmri/ synthmri/
COPY model/ model/
COPY training/ training/
COPY worker/ worker/
COPY api/ api/
COPY --chown=synthmri models/ /models/
RUN pip install -c constraints.txt . \
    && python -c "import torch; assert torch.version.cuda, 'expected a CUDA build of torch'"
COPY docker/worker-entrypoint.sh /usr/local/bin/worker-entrypoint
USER synthmri
ENTRYPOINT ["tini", "--", "worker-entrypoint"]

# ---------------------------------------------------------------------------
# train: DDP training with torchrun on every GPU of the host. Arguments after the
# image name go to training.train, e.g.
#   docker compose --profile trainer run --rm trainer --preset base-128 --data /data --out /models/mine
FROM worker AS train
ENTRYPOINT ["tini", "--", "torchrun", "--standalone", "--nproc-per-node=gpu", "-m", "training.train"]
CMD ["--help"]
