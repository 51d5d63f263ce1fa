# syntax=docker/dockerfile:1.7
# attnserve images. The export stage turns the torch module into a model directory; the runtime stage serves it with
# onnxruntime and carries no torch and no model/ source. One runtime stage for both providers: only the base differs
# (base-cpu, base-cuda), so building cpu checks every instruction the cuda image runs after its base.
#
#   docker build -t attnserve:cpu .                               # PROVIDER=cpu is the default
#   docker build --build-arg PROVIDER=cuda -t attnserve:cuda .
#   docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 attnserve:cpu [--flag value ...]   # HTTP, gRPC, metrics
#   docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 attnserve:cuda
#   make image                                                    # podman, no Docker or registry needed
#
# Every setting is a flag (appended to `docker run`) or an ATTNSERVE_* variable; flags win. `docker stop` waits 10 s
# by default, less than the 30 s drain (--drain-grace-s): give it `-t 35`.
# Base images are pinned by tag; add @sha256:... to a tag where builds must be bit-for-bit repeatable.

ARG PYTHON_IMAGE=python:3.11.16-slim-bookworm
# onnxruntime-gpu 1.31.1 on PyPI is built for CUDA 13.0 with cuDNN 9 (build_and_package_info.cuda_version is "13.0";
# its CUDA provider links libcudart.so.13 and libcublas.so.13), hence a CUDA 13.0 base: hosts need driver >= 580.
# Ubuntu 24.04 brings Python 3.12; 22.04's 3.10 is older than the project's 3.11 floor.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
# cpu or cuda: the runtime's base, requirements and ATTNSERVE_PROVIDER.
ARG PROVIDER=cpu
# torch alone comes from here: PyTorch's CPU index (PyPI's Linux torch pulls in gigabytes of CUDA libraries).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# Requirement files derived from pyproject.toml, the one place the pins live.
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /requirements
COPY pyproject.toml deploy/image/requirements.py /tmp/
RUN python3 /tmp/requirements.py /tmp/pyproject.toml /requirements

# Offline: torch -> ONNX, written to /models/attention.
FROM ${PYTHON_IMAGE} AS export
# Unset unless the builder passes it (make image: the host's pip settings, mounted read-only for the build).
ARG PIP_CONFIG_FILE
ARG TORCH_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    ORT_DISABLE_TELEMETRY=1
WORKDIR /src
COPY --from=requirements /requirements/ /requirements/
# A venv: a base may have no global pip (Debian's python3). torch alone from TORCH_INDEX_URL, then the rest from the
# default index: the onnxruntime and numpy that check parity here are the ones the cpu image serves with.
# --no-compile: this stage is thrown away, and bytecode for all of torch costs time and layer size for one export.
RUN python3 -m venv /opt/venv \
 && pip install --no-compile --index-url "${TORCH_INDEX_URL}" -r /requirements/torch.txt \
 && pip install --no-compile -r /requirements/export.txt -r /requirements/cpu.txt
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

# The runtime. Python in a venv on both bases: Ubuntu's is externally managed (PEP 668) and has no `python` command.
# ORT_DISABLE_TELEMETRY: onnxruntime 1.31 carries Microsoft's 1DS telemetry, which a server image has no use for;
# with it on and no writable home, every start also warns that it cannot persist a device id.

FROM ${PYTHON_IMAGE} AS base-cpu
# Not empty: buildah commits an empty stage under a new id on every build, and nothing built on it would come from
# its layer cache (the runtime's pip install on every change of service/).
ARG PROVIDER

FROM ${CUDA_IMAGE} AS base-cuda
ARG DEBIAN_FRONTEND=noninteractive
# Versions come with the pinned base image: Ubuntu's archive drops superseded versions, so pins would break builds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

# Everything from here on is the same for cpu and cuda. (buildah 1.28 finds the stage only when PROVIDER is
# passed as --build-arg; make image does.)
# hadolint ignore=DL3006
FROM base-${PROVIDER} AS runtime
ARG PROVIDER
ARG PIP_CONFIG_FILE
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    ORT_DISABLE_TELEMETRY=1 \
    ATTNSERVE_PROVIDER=${PROVIDER}
COPY --from=requirements /requirements/${PROVIDER}.txt /tmp/requirements.txt
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
EXPOSE 8000 8001 8002
STOPSIGNAL SIGTERM
# Plaintext probe of grpc.health.v1 (NOT_SERVING while warming up and draining). It probes the port that
# ATTNSERVE_HEALTH_PORT (set it when TLS is on) or ATTNSERVE_GRPC_PORT give, not ports given as flags.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-m", "service.app.healthcheck", "--timeout-s", "3"]
ENTRYPOINT ["python", "-m", "service", "--model-dir", "/models/attention", "--host", "0.0.0.0"]
