# make demo  -> the main job on the embedded default (bundled ml-latest-small, SmolLM2-135M-Instruct)
# make test  -> the test suite (offline, CPU; as root it also starts a two-node Slurm cluster here)
VENV ?= .venv
RUN_DIR ?= runs/default

.PHONY: install demo test test-fast test-slurm bench clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)

demo: install
	$(VENV)/bin/rerank-dist run run_dir=$(RUN_DIR)

test: install
	$(VENV)/bin/python -m pytest -q

test-fast: install
	$(VENV)/bin/python -m pytest -q -m "not slow"

test-slurm: install
	$(VENV)/bin/python -m pytest -q -m slurm

clean:
	rm -rf $(VENV) runs .pytest_cache
