# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs
# what it needs (python3 with venv, and a RabbitMQ: local, Docker, or the rabbitmq-server package).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FEDMQ  := $(VENV)/bin/fedmq

.PHONY: demo test test-fast lint bench clean

# Two stamps: `make demo` installs what `fedmq run` needs (the package); `make test`, `lint` and
# `bench` also install the test and dev extras. A venv that has the extras serves the demo too.
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(PY)
	if [ ! $(TEST_STAMP) -nt pyproject.toml ]; then $(PY) -m pip install --quiet -e .; fi
	touch $@

# The tests need PyTorch (fedmq.torch, examples/pytorch-cnn): the CPU build of one pinned
# release, installed first so that the test extra's torch range installs nothing bigger.
TORCH_PIN ?= torch==2.13.0

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet '$(TORCH_PIN)'
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $@

demo: $(DEMO_STAMP)
	$(FEDMQ) run --workers 6 --dataset digits --partition dirichlet --alpha 0.5 \
		--slow-workers 0.3 --slowdown 10 --mode async --strategy fedbuff --buffer-size 3 \
		--target-accuracy 0.95 --max-updates 600 --time-limit 60 --out runs/demo

test: $(TEST_STAMP)
	$(PY) -m pytest -q

test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(PY) scripts/typecheck.py

bench: $(TEST_STAMP)
	$(PY) bench/codec.py
	$(PY) bench/update_path.py
	$(PY) bench/round_time.py
	$(PY) bench/stragglers.py
	$(PY) bench/scale.py

clean:
	rm -rf $(VENV) runs .pytest_cache
