# `make test` and `make demo` each create .venv when it is missing, install everything, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pcpp-installed

# Offline, loopback-only defaults (see README "Security: what listens where").
export HF_HUB_OFFLINE := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export MPLBACKEND := Agg

.PHONY: install test unit integration demo lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from this machine's disk (pip caps it at 2.14.1), so nothing pulls another build.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	# DeepSpeed builds against the installed torch.
	$(PY) -m pip install -q --no-build-isolation 'deepspeed>=0.19,<0.20'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

unit: install
	$(PY) -m pytest -q -m unit

integration: install
	$(PY) -m pytest -q -m integration

DEMO_OUT ?= demo-out
# The quickstart pipeline on the offline sample: local Ray, SQLite MLflow under runs/demo, every stage.
demo: install
	$(VENV)/bin/pcpp quantizers --plot $(DEMO_OUT)/quantizers.png
	$(VENV)/bin/pcpp run pipelines/configs/demo.yaml

lint: install
	$(VENV)/bin/ruff check pcpp stages pipelines cluster tests bench

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
