# The front door: `make run` starts the whole stack on the embedded default, `make test` runs
# every check. Both call `make setup`, which builds .venv once and again only when a
# requirements or project file changes.
.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/influence/v1/*.proto)
PROTO_OUT := protos/gen
# An S3 server that checks signatures, for the tests of signed upload URLs (devstack/sigv4_s3.py)
S3RVER_STAMP := devstack/s3rver/node_modules/.installed
export OMP_NUM_THREADS ?= 1

.PHONY: help setup protos protos-check run demo test lint typecheck migrate bench-influence bench-artifacts bench-scale gpu-check bench-fuzz bench-load clean modal-deploy k8s-validate lint-docker images bench-counterfactual bench-cancel bench-query bench-query-stack bench-influence-memory gpu-check-wheels bench-list-memory bench-curate bench-datasets bench-shards

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP) $(S3RVER_STAMP) ## create .venv with everything the services and tests need (idempotent)

$(STAMP): requirements/runtime.txt requirements/dev.txt pyproject.toml gpu_core/pyproject.toml protos/pyproject.toml $(wildcard libs/*/pyproject.toml) $(wildcard clients/*/pyproject.toml) $(wildcard services/*/pyproject.toml)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements/dev.txt
	# kronfluence declares torchvision, which it never imports; see requirements/runtime.txt
	$(PIP) install -q --no-deps kronfluence==1.0.1
	$(PIP) install -q --no-deps --no-build-isolation $(foreach p,. gpu_core protos $(wildcard libs/*) $(wildcard clients/*) $(wildcard services/*),-e $(p))
	touch $@

$(S3RVER_STAMP): devstack/s3rver/package.json devstack/s3rver/package-lock.json
	cd devstack/s3rver && npm ci --no-audit --no-fund --silent
	touch $@

protos: ## regenerate the Python code for protos/ into protos/gen
	$(PY) -m grpc_tools.protoc -I protos --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) $(PROTO_SRC)
	touch $(PROTO_OUT)/influence/__init__.py $(PROTO_OUT)/influence/v1/__init__.py

protos-check: setup ## fail when protos/gen is stale
	$(PY) -m devstack.protos_check

run: setup ## start PostgreSQL and every service on loopback (the embedded default)
	$(PY) -m devstack run

demo: setup ## submit examples/ through the REST API of a running stack and print the results
	$(PY) -m devstack demo

migrate: setup ## apply the scheduler's database migrations
	$(PY) -m scheduler migrate

test: setup protos-check ## every test: lint, type check, manifests, Dockerfiles, unit, service, end to end, browser
	bash scripts/test.sh

lint: setup ## ruff lint and format check over every Python file (`ruff format .` fixes the layout)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup ## mypy over all non-test code ([tool.mypy] in pyproject.toml; cache in .mypy_cache)
	$(VENV)/bin/mypy

bench-influence: setup ## influence benchmark: wall time, peak memory, ratios
	$(PY) -m benchmarks.bench_influence

bench-influence-memory: setup ## peak RSS of Kronfluence on a ~50M-parameter model vs the model's size (target < 10%), live vs deep copy
	$(PY) -m benchmarks.influence_memory

bench-artifacts: setup ## 10,000 x 1,000 TracIn through the stack: scores.npy download, results size, time moving artifacts, estimate; 1 GiB artifact memory
	$(PY) -m benchmarks.artifacts
	$(PY) -m benchmarks.artifact_memory

bench-shards: setup ## 20,000 x 100 TracIn (projected) and TrackStar indexed by N = 1, 2, 4 shard processes: wall, speed-up, peak RSS per worker, bytes moved, agreement with N = 1
	$(PY) -m benchmarks.bench_shards

bench-scale: setup ## influence at scale: 10k-100k train with a projected index, projected vs exact TracIn, LDS
	$(PY) benchmarks/bench_scale.py

gpu-check: setup ## one prepared run on a CUDA GPU (1B-shaped model, 4-bit first, every method; JSON of figures); refuses without CUDA
	$(PY) -m benchmarks.gpu_check

# The GPU machine has no internet: the wheels it lacks are downloaded here, for its Python
# (GPU_CHECK_PYTHON) on x86-64 Linux, and carried there (scripts/gpu_check_device.sh).
GPU_CHECK_WHEELS ?= .gpu-check-wheels
GPU_CHECK_PYTHON ?= 3.11
GPU_CHECK_PLATFORMS := $(foreach p,manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_28_x86_64,--platform $(p))
gpu-check-wheels: setup ## download pydantic, kronfluence and bitsandbytes wheels for the offline GPU machine into $(GPU_CHECK_WHEELS)
	rm -rf $(GPU_CHECK_WHEELS)
	$(PIP) download -q --dest $(GPU_CHECK_WHEELS) --only-binary=:all: --python-version $(GPU_CHECK_PYTHON) $(GPU_CHECK_PLATFORMS) \
		$$(grep -E '^pydantic==' requirements/runtime.txt)
	# --no-deps: einconv would pull a CPU torch, kronfluence torchvision, bitsandbytes torch
	$(PIP) download -q --dest $(GPU_CHECK_WHEELS) --no-deps --only-binary=:all: --python-version $(GPU_CHECK_PYTHON) $(GPU_CHECK_PLATFORMS) \
		kronfluence==1.0.1 $$(grep -E '^(einconv|einops|opt_einsum)==' requirements/runtime.txt) \
		$$(grep -E '^bitsandbytes==' services/compute-runpod/worker/requirements.txt)
	du -sh $(GPU_CHECK_WHEELS)

bench-counterfactual: setup ## retrain without each method's top-1 on planted duplicates; LDS
	$(PY) benchmarks/counterfactual_check.py

bench-query: setup ## follow-up query latency, cold (fresh process) and warm, for 1k and 10k indexes on the tiny model (targets < 10 s, < 3 s)
	$(PY) -m benchmarks.query_latency

bench-query-stack: setup ## follow-up query-to-answer latency through the stack (compute-local warm worker), cold and warm, 1k and 10k indexes
	$(PY) -m benchmarks.query_stack_latency

bench-cancel: setup ## cancel latency per stage and method on the tiny model, in gpu_core and through the RunPod SDK loop (target < 5 s)
	$(PY) -m benchmarks.bench_cancel
	$(PY) -m benchmarks.bench_runpod_cancel

bench-load: setup ## 1,000 jobs from 50 users, two scheduler replicas, compute-local + fake RunPod: latency, CPU, calls
	$(PY) -m devstack.load_bench

bench-curate: setup ## planted label noise: recall of the suspicion rank vs loss and self-influence; drop the flagged 10% / keep 25% vs random, 3 seeds; the summary's share of wall time
	$(PY) -m benchmarks.curate

bench-datasets: setup ## a 100,000-example JSONL through POST /api/datasets and run through the stack (projected TracIn, 100 eval; BENCH_SHARDS=2: sharded): gateway and scheduler peak RSS
	$(PY) -m benchmarks.datasets_memory $(if $(N_TRAIN),--n-train $(N_TRAIN)) $(if $(BENCH_SHARDS),--shards $(BENCH_SHARDS))

bench-list-memory: setup ## ListJobs of 500 jobs with 10 MiB specs: scheduler RSS growth (target < 50 MB)
	$(PY) -m benchmarks.list_jobs_memory

bench-fuzz: setup ## schema fuzzing of every route + hostile data files + upload grants against a fresh stack (FUZZ_CASES=10000): server errors
	$(PY) -m devstack.fuzz_api --cases $(or $(FUZZ_CASES),10000)

modal-deploy: setup ## deploy the Modal app (needs MODAL_TOKEN_ID/SECRET; reads MODAL_APP_NAME, MODAL_FUNCTION_NAME, MODAL_PROGRESS_DICT, MODAL_GPU, MODAL_MAX_CONTAINERS, MODAL_HF_SECRET)
	$(VENV)/bin/modal deploy services/compute-modal/worker/modal_app.py

clean: ## remove the venv, embedded database and caches
	rm -rf $(VENV) .data .pytest_cache

k8s-validate: setup ## render every deploy/k8s overlay and validate it offline (kubernetes-validate --strict)
	bash scripts/k8s_validate.sh

lint-docker: setup ## hadolint every Dockerfile (fails above info)
	bash scripts/lint_docker.sh

IMAGE_SERVICES := gateway scheduler keyvault compute-local compute-runpod compute-modal
IMAGE_TAG ?= dev
IMAGE_PREFIX ?= influence-
images: ## build every service image with docker (IMAGE_PREFIX, IMAGE_TAG; e.g. IMAGE_PREFIX=ghcr.io/org/repo/influence-)
	set -e; for service in $(IMAGE_SERVICES); do \
	  docker build -f services/$$service/Dockerfile -t $(IMAGE_PREFIX)$$service:$(IMAGE_TAG) . ; \
	done
	docker build -f services/compute-runpod/worker/Dockerfile -t $(IMAGE_PREFIX)worker:$(IMAGE_TAG) .
