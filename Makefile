# Two commands for a new user: `make demo` and `make test` (README.md).
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
SHARED  ?= ../shared
DATA    := $(SHARED)/data/cifar10-5k-train.npz
DEMO    := runs/demo

.PHONY: venv demo test clean

# torch first and pinned: these exact versions come from this machine's disk, no download.
$(BIN)/edgessl: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/edgessl

demo: venv
	rm -rf $(DEMO)
	$(BIN)/edgessl pretrain --config configs/demo.yaml --data npz:$(DATA) --out $(DEMO)
	$(BIN)/edgessl export $(DEMO) --out $(DEMO)/encoder.onnx
	$(BIN)/edgessl check $(DEMO)/encoder.onnx --against $(DEMO) --batch-sizes 1,32

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
