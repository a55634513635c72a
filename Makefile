# Adapter Deploy: one target per phase, plus deploy/rollback/status/demo/test.
# Variables reach the scripts as single arguments (exported, then quoted), so a
# value with spaces or shell characters stays one value and never runs as code.
# Scripts exit with the documented codes (adapter_deploy/common/errors.py); make
# itself exits 2 whenever a recipe fails.

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
USER_VARS := PARAMS MODEL MODELS CYCLE VERSION SRC METRICS ENDPOINT TO DRY_RUN JSON FORMAT \
  ENGINE BASE FORCE PYTEST_ARGS GGUF_TYPE
# Take each value as typed: make would otherwise expand $(...) inside it.
$(foreach v,$(USER_VARS),$(eval override $(v) := $$(value $(v))))
export $(USER_VARS)

.DEFAULT_GOAL := help

help: ## list every target with one line
	@grep -hE '^[a-z][a-z -]*:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*## "} {printf "  make %-32s %s\n", $$1, $$2}'

install: $(VENV)/.install-stamp ## create .venv and install the project (idempotent)

$(VENV)/.install-stamp: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

# llama.cpp's tools for GGUF releases. llama-cpp-python builds llama.cpp from source (about
# 5 minutes on 2 cores), so its wheel is built once and kept outside the checkout.
LLAMA_CPP_VERSION := 0.3.36
WHEELS := $${XDG_CACHE_HOME:-$$HOME/.cache}/adapter-deploy/wheels

gguf-tools: $(VENV)/.gguf-stamp ## install llama-cpp-python + gguf (wheel built once, cached)

$(VENV)/.gguf-stamp: $(VENV)/.install-stamp
	@w="$(WHEELS)"; mkdir -p "$$w"; \
	if ! ls "$$w"/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) once (~5 min; cached in $$w)"; \
	  CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF}" $(PY) -m pip wheel --quiet --no-deps \
	    -w "$$w" "llama-cpp-python==$(LLAMA_CPP_VERSION)"; \
	fi; \
	$(PY) -m pip install --quiet --find-links "$$w" \
	  "llama-cpp-python==$(LLAMA_CPP_VERSION)" "gguf>=0.17"
	@touch $@

test: install gguf-tools ## run the test suite (pytest)
	$(PY) -m pytest $${PYTEST_ARGS:--q}

lint: install ## ruff check + format check + the layer rule (import-linter)
	$(PY) -m ruff check scripts engines tests bench
	$(PY) -m ruff format --check scripts engines tests bench
	$(VENV)/bin/lint-imports

version: install ## MODEL=gemma_4b CYCLE=1 SRC=dir [METRICS=json]: version an adapter
	$(PY) scripts/version.py --model "$$MODEL" --cycle "$$CYCLE" --src "$$SRC" \
	  $${METRICS:+--metrics "$$METRICS"}

versions: install ## [MODEL=...]: table of versions per model
	$(PY) scripts/versions.py $${MODEL:+--model "$$MODEL"} $${JSON:+--json}

# Shell fragments: MODELS/ENDPOINT are lists (split on spaces, globbing off); the rest are
# single quoted arguments.
SELECT = set -f; if [ -n "$$MODELS" ]; then sel=(--models $$MODELS); else sel=(--all-adapters); fi
WHAT = $${CYCLE:+--cycle "$$CYCLE"} $${VERSION:+--version "$$VERSION"}
FLAGS = $${DRY_RUN:+--dry-run} $${JSON:+--json} $${FORCE:+--force}

convert: install ## MODEL=gemma_4b CYCLE=1 FORMAT=merged|bitsandbytes|gguf [GGUF_TYPE=..]: convert
	@$(PY) scripts/convert.py --model "$$MODEL" $(WHAT) --format "$$FORMAT" \
	  $${GGUF_TYPE:+--gguf-type "$$GGUF_TYPE"} $${JSON:+--json}

history: install ## [MODEL=...]: versions, metrics per cycle and where each was deployed
	@$(PY) scripts/history.py $${MODEL:+--model "$$MODEL"} $${JSON:+--json}

deploy: install ## CYCLE=1 ENDPOINT="a b" [MODELS="m1 m2"] [DRY_RUN=1]: full deploy
	@$(SELECT); $(PY) scripts/deploy_adapters.py $(WHAT) $${ENDPOINT:+--endpoints $$ENDPOINT} \
	  "$${sel[@]}" $(FLAGS)

rollback: install ## [ENDPOINT=..] [MODELS=..] [TO=version_id]: roll back (bare: last deploy)
	@set -f; $(PY) scripts/deploy_adapters.py --rollback $${ENDPOINT:+--endpoints $$ENDPOINT} \
	  $${MODELS:+--models $$MODELS} $${TO:+--to "$$TO"} $(FLAGS)

status: install ## [ENDPOINT=..]: endpoint x model table, read live (JSON=1 for JSON)
	@set -f; $(PY) scripts/status.py $${ENDPOINT:+--endpoints $$ENDPOINT} $${JSON:+--json}

transfer precheck activate verify: install ## CYCLE=1 ENDPOINT=..: run one deploy phase alone
	@set -f; $(PY) scripts/phase.py $@ $(WHAT) $${ENDPOINT:+--endpoints $$ENDPOINT} \
	  $${MODELS:+--models $$MODELS} $${JSON:+--json}

health-check: install ## MODEL=gemma_4b SRC=adapter_dir [BASE=..] [ENGINE=hf|mlx]: local check
	@$(PY) scripts/health_check.py --model "$$MODEL" --adapter-dir "$$SRC" \
	  $${BASE:+--base-model "$$BASE"} $${ENGINE:+--engine "$$ENGINE"} $${JSON:+--json}

bootstrap: install ## ENDPOINT=..: copy this project to the endpoint's project_dir and install
	@set -f; $(PY) scripts/bootstrap.py --endpoints $$ENDPOINT

keygen: install ## create the ed25519 signing key (path: store.signing_key in params.yaml)
	@$(PY) scripts/keygen.py

trust: install ## ENDPOINT=..: install the public signing key on endpoints
	@set -f; $(PY) scripts/trust.py $${ENDPOINT:+--endpoints $$ENDPOINT}

demo: install ## the whole story on a tiny local model and a local endpoint (under demo/)
	@$(PY) scripts/demo.py

demo-clean: ## stop the demo service and remove demo/
	@test -x $(PY) && $(PY) scripts/demo.py --clean || rm -rf demo

bench: install ## run the benchmarks and print their figures
	$(PY) bench/run_all.py

gpu-check: install ## NVIDIA only: 4-bit bitsandbytes, fp16, adapter reload on CUDA, health-checked
	$(PY) bench/gpu_check.py

.PHONY: help install test lint version versions bench gpu-check gguf-tools deploy rollback status transfer precheck \
  activate verify health-check bootstrap demo demo-clean history keygen trust convert
