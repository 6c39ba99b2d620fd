# The two commands of the README: `make book` and `make test`. Both set everything up themselves.
PYTHON_BOOTSTRAP ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= params/tiny.yaml
PYTEST_ARGS ?=

# Offline copies of the data, when this checkout sits next to them (the project's machines and CI);
# elsewhere the loaders read the Hugging Face Hub.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)/mmlu_pro),)
export MOE_MMLU_PRO_DIR ?= $(SHARED_DATA)/mmlu_pro
export MOE_WIKITEXT_DIR ?= $(SHARED_DATA)/wikitext-2
export MOE_MMLU_DIR ?= $(SHARED_DATA)/mmlu
export MOE_BLIMP_DIR ?= $(SHARED_DATA)/blimp
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
endif

.PHONY: book test setup bench clean

setup: $(VENV)/.installed

# torch first (the CPU build; on a GPU machine install your CUDA build of torch before `make`),
# then the package with its test extras.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

book: setup
	$(PY) -m moe_utils.pipeline --profile $(PROFILE)

# The browser test of the built book (tests/test_book_html.py) skips without _build/html: `make book` first
# (CI sets MOE_REQUIRE_BOOK=1 to make that a failure). It installs Debian's chromium when missing.
test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) bench/capture.py

clean:
	rm -rf _build book/executed artifacts
