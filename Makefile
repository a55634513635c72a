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
  ENGINE BASE FORCE PYTEST_ARGS GGUF_TYPE LOG_JSON
# Take each value as typed: make would otherwise expand $(...) inside it.
$(foreach v,$(USER_VARS),$(eval override $(v) := $$(value $(v))))
export $(USER_VARS)

.DEFAULT_GOAL := help

help: ## list every target with one line
	@grep -hE '^[a-z][a-z -]*:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*## "} {printf "  make %-32s %s\n", $$1, $$2}'

# uv installs the locked versions (uv.lock) so the training machine and every endpoint run the
# same transformers, peft, mlx-lm...; where uv is missing it is installed from the package index
# into the cache (a venv of its own: no system pip, no PEP 668 trouble; it brings the Python of
# .python-version where the machine's python3 is older, as on a Mac with 3.9).
UV_HOME := $${XDG_CACHE_HOME:-$$HOME/.cache}/adapter-deploy/uv
FIND_UV = uv="$$(command -v uv || echo "$(UV_HOME)/bin/uv")"; if [ ! -x "$$uv" ]; then \
  echo "uv is missing: installing it into $(UV_HOME)"; $(PYTHON) -m venv "$(UV_HOME)" && \
  "$(UV_HOME)/bin/python" -m pip install --quiet "uv>=0.8"; fi
# torch's build depends on the machine (CPU here, CUDA on NVIDIA, Metal on a Mac), so uv.lock
# leaves it out and pip installs this exact version with the machine's own configuration.
TORCH_VERSION := 2.13.0
# The training machine: version store (extra "train") + dev tools; an endpoint: serving only.
SYNC_TRAIN := --extra train
SYNC_ENDPOINT := --no-dev
# --inexact: keep torch and llama-cpp-python, which the lock leaves to this Makefile.
SYNC = set -e; $(FIND_UV); test -x $(PY) || "$$uv" venv --quiet --seed $(VENV); \
  "$$uv" sync --quiet --inexact --locked $(1); echo "$(1)" > $(VENV)/.sync-flags; \
  $(PY) -c 'from importlib.metadata import version as v; assert v("torch").split("+")[0] == "$(TORCH_VERSION)"' \
    2>/dev/null || $(PY) -m pip install --quiet torch==$(TORCH_VERSION)

# The system tools a target needs (git, rsync, ssh; sshd, cmake, a C++ compiler for the tests),
# checked on the machine's own python3 before anything is installed: one line per missing tool
# with its apt-get and Homebrew command, exit 2 (adapter_deploy/common/prereqs.py: standard
# library only, run by path; -I keeps the checkout off sys.path). The roles come from the goals
# named (make install-endpoint gguf-tools: both); every role adds "install" (uv, or a venv).
ROLE_demo := demo
ROLE_test := test
ROLE_test-e2e := test
ROLE_test-all := test
ROLE_deploy := train
ROLE_bootstrap := train
ROLE_gguf-tools := gguf
ROLE_install-endpoint := endpoint
PREREQS_ROLE ?= $(sort $(foreach goal,$(MAKECMDGOALS),$(ROLE_$(goal))))

prereqs: ## [PREREQS_ROLE=train|demo|test|gguf|endpoint]: are the system tools that role needs here?
	@command -v $(PYTHON) >/dev/null || { echo "missing $(PYTHON): make runs it. Install: sudo" \
	  "apt-get install -y python3 (Debian/Ubuntu) or xcode-select --install (macOS)" >&2; exit 2; }
	@$(PYTHON) -I scripts/adapter_deploy/common/prereqs.py --role install \
	  $(foreach role,$(PREREQS_ROLE),--role $(role)) --uv "$(UV_HOME)/bin/uv"

install: $(VENV)/.install-stamp ## create .venv with the locked versions (training machine + dev tools)

$(VENV)/.install-stamp: pyproject.toml uv.lock .python-version | prereqs
	@$(call SYNC,$(SYNC_TRAIN))
	@touch $@

install-endpoint: $(VENV)/.endpoint-stamp ## what an endpoint needs to serve (make bootstrap runs it there)

$(VENV)/.endpoint-stamp: pyproject.toml uv.lock .python-version | prereqs
	@$(call SYNC,$(SYNC_ENDPOINT))
	@touch $@

lock: ## re-resolve uv.lock after a change to pyproject.toml's dependencies
	@$(FIND_UV); "$$uv" lock

# llama.cpp's tools for GGUF releases, all from one llama-cpp-python sdist (downloaded once into
# the cache): its wheel, built from source (about 5 minutes on 2 cores, kept outside the
# checkout; a CUDA build where `nvcc` and the NVIDIA driver are, a portable CPU build elsewhere; CMAKE_ARGS in
# the environment wins), and llama.cpp's own HF->GGUF converter (convert_hf_to_gguf.py, its
# conversion/ and gguf-py/ packages, models/templates) extracted into the cache
# (llama.cpp-<version>/, or $$ADAPTER_DEPLOY_LLAMA_CPP), where adapter_deploy.convert.gguf runs it.
# Both are pinned in adapter_deploy/convert/converter_tree.py: the sdist's sha256 (checked before
# it is built or extracted; a mismatch deletes that download) and the sha256 of the converter's
# file list, recorded file by file in its converter.json and checked before every run.
# Keep LLAMA_CPP_VERSION equal to adapter_deploy.convert.converter_tree.LLAMA_CPP_VERSION.
LLAMA_CPP_VERSION := 0.3.36
GGUF_CACHE := $${XDG_CACHE_HOME:-$$HOME/.cache}/adapter-deploy
WHEELS := $(GGUF_CACHE)/wheels
LLAMA_SDIST := $(GGUF_CACHE)/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
GGUF_TOOLS := $(PY) -m adapter_deploy.cli.gguf_tools
# CUDA needs the toolkit (nvcc) to build and the driver (nvidia-smi ships with it) to load: a
# box with nvcc but no driver gets the CPU build, which imports there.
GGUF_CMAKE_ARGS := $${CMAKE_ARGS:-$$(command -v nvcc >/dev/null 2>&1 && \
  command -v nvidia-smi >/dev/null 2>&1 && echo -DGGML_CUDA=on || echo -DGGML_NATIVE=OFF)}
# The sdist, fetched once (pip's own client; the wheel and the converter both come from it) and
# checked against its pinned sha256 each time it is used.
FETCH_SDIST = sd="$(LLAMA_SDIST)"; if [ ! -f "$$sd" ]; then \
  $(PY) -m pip download --quiet --no-deps --no-binary :all: -d "$$(dirname "$$sd")" \
    "llama-cpp-python==$(LLAMA_CPP_VERSION)"; fi; $(GGUF_TOOLS) check-sdist "$$sd"

gguf-tools: $(VENV)/.gguf-stamp ## llama-cpp-python (CUDA build where nvcc+driver) + llama.cpp's converter
	@set -e; if ! $(GGUF_TOOLS) verify; then $(FETCH_SDIST); $(GGUF_TOOLS) install "$$sd"; fi

gguf-cmake-args: ## print the CMAKE_ARGS `make gguf-tools` builds llama-cpp-python with here
	@echo "$(GGUF_CMAKE_ARGS)"

$(VENV)/.gguf-stamp: $(wildcard $(VENV)/.sync-flags) | prereqs
	@test -f $(VENV)/.sync-flags || { echo "run make install (or make install-endpoint) first"; exit 2; }
	@set -e; args="$(GGUF_CMAKE_ARGS)"; w="$(WHEELS)"; \
	case "$$args" in *GGML_CUDA=on*) w="$$w/cuda";; esac; mkdir -p "$$w"; \
	if ! ls "$$w"/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then \
	  $(FETCH_SDIST); \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) once (CMAKE_ARGS=$$args; cached in $$w)"; \
	  CMAKE_ARGS="$$args" $(PY) -m pip wheel --quiet --no-deps -w "$$w" "$$sd"; \
	fi; \
	$(PY) -m pip install --quiet --no-index --find-links "$$w" \
	  "llama-cpp-python==$(LLAMA_CPP_VERSION)" || $(PY) -m pip install --quiet --find-links "$$w" \
	  "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	@$(FIND_UV); "$$uv" sync --quiet --inexact --locked --extra gguf $$(cat $(VENV)/.sync-flags)
	@touch $@

# Two tiers (docs/testing.md): `make test` is every path once, held to the CPU budget in
# tests/budget.json; `make test-e2e` is the long stories (pytest.mark.e2e); E2E_WORKERS=2 runs it on two pytest-xdist workers.
# Both print wall and CPU time and the 15 slowest tests. PYTEST_ARGS adds flags (-k, -x, -v).
test: install gguf-tools ## the default test tier (~12 min on 2 cores; fails past its CPU budget)
	$(PY) -m pytest -q -m "not e2e" --budget tests/budget.json --tier default $${PYTEST_ARGS}

test-e2e: install gguf-tools ## the end-to-end tier: kill matrices, interrupted transfers, disk-full, remotes
	$(PY) -m pytest -q -m e2e -n $${E2E_WORKERS:-0} --dist loadfile $${PYTEST_ARGS}

test-all: test test-e2e ## both tiers, as .ci/run runs them

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

promote: install ## CYCLE=1 ENDPOINT="pulling endpoints or groups" [MODELS=..]: desired state in git
	@set -f; $(PY) scripts/promote.py $(WHAT) $${ENDPOINT:+--endpoints $$ENDPOINT} \
	  $${MODELS:+--models $$MODELS} $${JSON:+--json}

pull: ## on a pulling endpoint [ENDPOINT=..] [FORCE=1]: fetch and deploy what was promoted to it
	@test -x $(PY) || { echo "run make install-endpoint first"; exit 2; }
	@$(PY) scripts/pull.py $${ENDPOINT:+--endpoint "$$ENDPOINT"} $${FORCE:+--force} $${JSON:+--json}

.PHONY: promote pull

status: install ## [ENDPOINT=..]: endpoint x model table, read live (JSON=1 for JSON)
	@set -f; $(PY) scripts/status.py $${ENDPOINT:+--endpoints $$ENDPOINT} $${JSON:+--json}

doctor: install ## [ENDPOINT=..] [JSON=1]: live preflight per endpoint: would a deploy work?
	@set -f; $(PY) scripts/doctor.py $${ENDPOINT:+--endpoints $$ENDPOINT} $${JSON:+--json}

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

service-install: install ## ENDPOINT=.. [DRY_RUN=1]: install + start the service (systemd user unit / launchd)
	@set -f; $(PY) scripts/service_install.py $${ENDPOINT:+--endpoints $$ENDPOINT} \
	  $${DRY_RUN:+--dry-run} $${JSON:+--json}

demo: install ## the whole story on a tiny local model and a local endpoint (under demo/)
	@$(PY) scripts/demo.py

demo-clean: ## stop the demo service and remove demo/
	@test -x $(PY) && $(PY) scripts/demo.py --clean || rm -rf demo

bench: install ## run the benchmarks and print their figures
	$(PY) bench/run_all.py

gpu-check: install ## NVIDIA only: 4-bit bitsandbytes, fp16, adapter reload on CUDA, health-checked
	$(PY) bench/gpu_check.py

.PHONY: help prereqs install install-endpoint lock test lint version versions bench gpu-check gguf-tools gguf-cmake-args deploy rollback status doctor transfer precheck \
  activate verify health-check bootstrap demo demo-clean history keygen trust convert service-install
