# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs
# what it needs (python3 with venv, and a RabbitMQ: local, Docker, or the rabbitmq-server package).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FEDMQ  := $(VENV)/bin/fedmq

.PHONY: demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $@

demo: $(VENV)/.installed
	$(FEDMQ) run --workers 6 --dataset digits --partition dirichlet --alpha 0.5 \
		--slow-workers 0.3 --slowdown 10 --mode async --strategy fedbuff --buffer-size 3 \
		--target-accuracy 0.95 --max-updates 600 --time-limit 60 --out runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) scripts/typecheck.py

bench: $(VENV)/.installed
	$(PY) bench/codec.py
	$(PY) bench/update_path.py
	$(PY) bench/round_time.py
	$(PY) bench/stragglers.py
	$(PY) bench/scale.py

clean:
	rm -rf $(VENV) runs .pytest_cache
