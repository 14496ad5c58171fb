VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench bench-quick fuzz lint format clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q -n 2 tests

demo: $(STAMP)
	$(PY) -m jaxconv demo

bench: $(STAMP)
	$(PY) -m bench

bench-quick: $(STAMP)
	$(PY) -m bench --quick

FUZZ_EXAMPLES ?= 10000
FUZZ_REPORT ?= $(or $(TMPDIR),/tmp)/jaxconv-fuzz-report

fuzz: $(STAMP)
	rm -rf $(FUZZ_REPORT)
	JAXCONV_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) JAXCONV_FUZZ_REPORT=$(FUZZ_REPORT) \
	  $(PY) -m pytest -q -n 2 tests/test_fuzz.py tests/test_fuzz_conv.py tests/test_fuzz_half.py -p no:cacheprovider; status=$$?; \
	  $(PY) tests/fuzz_support.py $(FUZZ_REPORT); exit $$status

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
