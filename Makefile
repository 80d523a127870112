# The two commands of the README: `make demo` and `make test`.
# Both build the virtual environment from nothing on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup clean gpu-wheels gpu-check

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch 2.13.0 first, for a reproducible venv (the tested release); the package asks for torch>=2.7,
	# so the editable install keeps it, as it keeps a torch a user already has.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m rwkv_sft demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The GPU check (scripts/gpu_check.py): `make gpu-wheels` where pip reaches PyPI puts the packages a
# GPU machine without network may lack into .whl/; `make gpu-check` there installs them offline and
# runs every CUDA path with the machine's own python3 and torch.
gpu-wheels:
	python3 scripts/gpu_check.py --download-wheels .whl

gpu-check:
	python3 scripts/gpu_check.py

clean:
	rm -rf $(VENV) runs .pytest_cache
