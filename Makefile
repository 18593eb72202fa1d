# Set-up and the two commands of the README. Everything installs into .venv from the project's own files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on the CI machines' disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The oldest transformers we support (what the GPU machines carry); `make test` checks the model on it too.
OLDEST_TRANSFORMERS ?= transformers==5.17.0
PYTEST_WORKERS ?= 2
# The versions CI tested: the default suite installs exactly these, so that a fresh clone tests what CI tested.
CONSTRAINTS ?= constraints.txt

.PHONY: setup main test test-core test-oldest test-newest test-slow clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" -c $(CONSTRAINTS)
	$(PY) -m pip install -q -e ".[test]" -c $(CONSTRAINTS)
	touch $@

setup: $(VENV)/.installed

# The main job: train a tiny LongNet on the embedded data, save it, reload it through AutoModelForCausalLM, generate.
main: setup
	$(PY) scripts/main.py

# The test command of the README; .ci/run calls exactly this.
test: test-core test-oldest

test-core: setup
	$(PY) -m pytest -n $(PYTEST_WORKERS) -q

# The model tests again under the oldest supported transformers (KV cache argument `past_key_values`).
$(VENV)-oldest/.installed: pyproject.toml constraints-oldest.txt
	$(PYTHON) -m venv $(VENV)-oldest
	$(VENV)-oldest/bin/python -m pip install -q --upgrade pip
	$(VENV)-oldest/bin/python -m pip install -q "$(TORCH_SPEC)" -c constraints-oldest.txt
	$(VENV)-oldest/bin/python -m pip install -q -e ".[test]" "$(OLDEST_TRANSFORMERS)" -c constraints-oldest.txt
	touch $@

test-oldest: $(VENV)-oldest/.installed
	$(VENV)-oldest/bin/python -m pytest -n $(PYTEST_WORKERS) -q -m "transformers_versions and not slow"

# The whole default suite on the newest releases that pyproject.toml admits (not part of CI: a new release can
# break it without a change here; when it passes, refresh constraints.txt from .venv-newest).
test-newest:
	rm -rf $(VENV)-newest
	$(PYTHON) -m venv $(VENV)-newest
	$(VENV)-newest/bin/python -m pip install -q --upgrade pip
	$(VENV)-newest/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)-newest/bin/python -m pip install -q --upgrade -e ".[test]"
	$(VENV)-newest/bin/python -m pytest -n $(PYTEST_WORKERS) -q

test-slow: setup
	$(PY) -m pytest -n $(PYTEST_WORKERS) -q -m slow

clean:
	rm -rf $(VENV) $(VENV)-oldest $(VENV)-newest outputs
