# Two commands do all the set-up on a machine with Python 3.11:
#   make run    a local distributed SAC run on MinitaurBulletEnv-v0
#   make test   the test suite
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test bench bench-gpu learn venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 (dm-reverb has no wheels for other versions) or run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "error: $(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())'), need 3.11; run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,learn]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python -m launcher $(ARGS)

# Two workers: the suite mostly waits on the processes it starts.
PYTEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/python -m bench.run $(ARGS)

# One prepared accelerator check (about 5 minutes; one JSON document).
bench-gpu: $(STAMP)
	$(VENV)/bin/python -m bench.gpu $(ARGS)

learn: $(STAMP)
	$(VENV)/bin/python -m bench.learning $(ARGS)

clean:
	rm -rf $(VENV) runs
