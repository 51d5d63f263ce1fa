# syntax=docker/dockerfile:1.7
# attnserve images. The export stage turns the torch module into a model directory; the runtime targets serve it
# with onnxruntime and carry no torch and no model/ source.
#
#   docker build --target cpu  -t attnserve:cpu  .    # cpu is also the default: the last stage
#   docker build --target cuda -t attnserve:cuda .
#   docker run --rm -p 8001:8001 -p 8002:8002 attnserve:cpu [--flag value ...]
#   docker run --rm --gpus all -p 8001:8001 -p 8002:8002 attnserve:cuda
#
# Every setting is a flag (appended to `docker run`) or an ATTNSERVE_* variable; flags win. `docker stop` waits 10 s
# by default, less than the 30 s drain (--drain-grace-s): give it `-t 35`.
# Base images are pinned by tag; add @sha256:... to a tag where builds must be bit-for-bit repeatable.

ARG PYTHON_IMAGE=python:3.11.16-slim-bookworm
# onnxruntime-gpu 1.31.1 on PyPI is built for CUDA 13.0 with cuDNN 9 (build_and_package_info.cuda_version is "13.0";
# its CUDA provider links libcudart.so.13 and libcublas.so.13), hence a CUDA 13.0 base: hosts need driver >= 580.
# Ubuntu 24.04 brings Python 3.12; 22.04's 3.10 is older than the project's 3.11 floor.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# Requirement files derived from pyproject.toml, the one place the pins live.
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /requirements
COPY pyproject.toml /tmp/pyproject.toml
# Keep a blank line after the heredoc: hadolint 2.15 fails to parse the file without one.
RUN python3 - <<'PY'
import tomllib
from pathlib import Path

project = tomllib.loads(Path("/tmp/pyproject.toml").read_text())["project"]
runtime, export = project["dependencies"], project["optional-dependencies"]["export"]
assert any(r.startswith("onnxruntime-gpu==") for r in runtime), "expected onnxruntime-gpu pinned in dependencies"
assert not any(r.startswith("torch") for r in runtime), "torch must stay out of the runtime dependencies"
# cpu: plain onnxruntime of the same version. The -gpu wheel runs on CPU too, but its CUDA and TensorRT
# providers (about 300 MB) are never loaded on a CPU host.
Path("cpu.txt").write_text("\n".join(r.replace("onnxruntime-gpu==", "onnxruntime==") for r in runtime) + "\n")
Path("cuda.txt").write_text("\n".join(runtime) + "\n")
Path("torch.txt").write_text("\n".join(r for r in export if r.startswith("torch==")) + "\n")
Path("export.txt").write_text("\n".join(r for r in export if not r.startswith("torch==")) + "\n")
PY

# Offline: torch -> ONNX, written to /models/attention.
FROM ${PYTHON_IMAGE} AS export
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    ORT_DISABLE_TELEMETRY=1
WORKDIR /src
COPY --from=requirements /requirements/ /requirements/
# torch alone from PyTorch's CPU index (PyPI's Linux torch pulls in gigabytes of CUDA libraries), then the rest from
# PyPI: the onnxruntime and numpy that check parity here are the ones the cpu image serves with.
RUN pip install --index-url https://download.pytorch.org/whl/cpu -r /requirements/torch.txt \
 && pip install -r /requirements/export.txt -r /requirements/cpu.txt
COPY model/ model/
# model/ reads checkpoints and runs the float64 reference through the client's copy of them; its dependencies
# (grpcio, protobuf, numpy) came with cpu.txt above.
COPY client/ client/
RUN pip install --no-deps ./client
# --no-calibrate: calibration times the graph forms on the machine that builds the image (a CI runner, not where it
# serves), and its noise would give every build a different routing table and config.json. The built-in table runs
# mha everywhere, never far from the fastest form on CPU (reports/model_bench.md) and what CUDA runs anyway. To
# route by measurement, export on the serving hardware and mount that directory over /models/attention.
ARG EXPORT_ARGS="--no-calibrate"
RUN python -m model.export --out /models/attention ${EXPORT_ARGS} \
 && chmod -R a-w /models

# Runtime targets. Their ENV, layout and last instructions match (tests/deploy/test_dockerfile.py compares them).
# Python in a venv in both: Ubuntu's is externally managed (PEP 668) and has no `python` command.
# ORT_DISABLE_TELEMETRY: onnxruntime 1.31 carries Microsoft's 1DS telemetry, which a server image has no use for;
# with it on and no writable home, every start also warns that it cannot persist a device id.

FROM ${CUDA_IMAGE} AS cuda
ARG DEBIAN_FRONTEND=noninteractive
# Versions come with the pinned base image: Ubuntu's archive drops superseded versions, so pins would break builds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    ORT_DISABLE_TELEMETRY=1 \
    ATTNSERVE_PROVIDER=cuda
COPY --from=requirements /requirements/cuda.txt /tmp/requirements.txt
RUN python3 -m venv /opt/venv \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt \
 && groupadd --system --gid 10001 attnserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin attnserve
COPY --from=export /models/ /models/
COPY service/ /app/service/
RUN python -m compileall -q /app/service && chmod -R a-w /app
WORKDIR /app
USER 10001:10001
EXPOSE 8001 8002
STOPSIGNAL SIGTERM
# Plaintext probe of grpc.health.v1 (NOT_SERVING while warming up and draining). It probes the port that
# ATTNSERVE_HEALTH_PORT (set it when TLS is on) or ATTNSERVE_GRPC_PORT give, not ports given as flags.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-m", "service.app.healthcheck", "--timeout-s", "3"]
ENTRYPOINT ["python", "-m", "service", "--model-dir", "/models/attention", "--host", "0.0.0.0"]

FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    ORT_DISABLE_TELEMETRY=1 \
    ATTNSERVE_PROVIDER=cpu
COPY --from=requirements /requirements/cpu.txt /tmp/requirements.txt
RUN python3 -m venv /opt/venv \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt \
 && groupadd --system --gid 10001 attnserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin attnserve
COPY --from=export /models/ /models/
COPY service/ /app/service/
RUN python -m compileall -q /app/service && chmod -R a-w /app
WORKDIR /app
USER 10001:10001
EXPOSE 8001 8002
STOPSIGNAL SIGTERM
# Plaintext probe of grpc.health.v1 (NOT_SERVING while warming up and draining). It probes the port that
# ATTNSERVE_HEALTH_PORT (set it when TLS is on) or ATTNSERVE_GRPC_PORT give, not ports given as flags.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-m", "service.app.healthcheck", "--timeout-s", "3"]
ENTRYPOINT ["python", "-m", "service", "--model-dir", "/models/attention", "--host", "0.0.0.0"]
