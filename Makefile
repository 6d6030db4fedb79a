# Two commands for a new user: `make demo` and `make test` (README.md).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.14.1 torchvision==0.29.1
SHARED  ?= ../shared
CACHE   ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/edgessl/datasets
# the demo's images: the CIFAR-10 file in ../shared when it is there, else CIFAR-10 downloaded once
# through torchvision into the user's cache (a failed download says what to pass instead: DEMO_DATA=SPEC)
DEMO_DATA ?= $(if $(wildcard $(SHARED)/data/cifar10-5k-train.npz),npz:$(SHARED)/data/cifar10-5k-train.npz,cifar10:$(CACHE)/cifar10 --download)
DEMO    := runs/demo

.PHONY: venv demo test test-avx2 arm64-check gpu-check clean

# torch first, at the versions the project is tested with (TORCH= overrides, e.g. a CUDA build)
# then the device runtime (export/, a package of its own that edgessl depends on), then edgessl
$(BIN)/edgessl: pyproject.toml export/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ./export
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/edgessl

# the other runtimes (OpenVINO, LiteRT, ExecuTorch), for their tests; torch stays at the pin
$(VENV)/.runtimes: $(BIN)/edgessl
	$(BIN)/pip install -q $(TORCH) -e '.[test,all]'
	touch $@

demo: venv
	rm -rf $(DEMO)
	@echo "== 1/6 pretrain: 5 minutes, MobileNetV3-small, 20% of the images held out"
	$(BIN)/edgessl pretrain --config configs/demo.yaml --data $(DEMO_DATA) --out $(DEMO)
	@echo "== 2/6 export to ONNX, fp32 and int8, each checked against torch"
	$(BIN)/edgessl export $(DEMO) --out $(DEMO)/encoder.onnx
	$(BIN)/edgessl export $(DEMO) --out $(DEMO)/encoder-int8.onnx --precision int8
	@echo "== 3/6 check: parity and latency through onnxruntime"
	$(BIN)/edgessl check $(DEMO)/encoder.onnx --against $(DEMO) --batch-sizes 1,32
	$(BIN)/edgessl check $(DEMO)/encoder-int8.onnx --against $(DEMO) --batch-sizes 1,32
	@echo "== 4/6 fine-tune on 10 labels per class, tested on the held-out images"
	$(BIN)/edgessl finetune $(DEMO) --labels-per-class 10 --out $(DEMO)/finetune
	@echo "== 5/6 export the classifier"
	$(BIN)/edgessl export $(DEMO)/finetune --out $(DEMO)/classifier.onnx
	@echo "== 6/6 reports: open them in a browser"
	$(BIN)/edgessl report $(DEMO)
	$(BIN)/edgessl report $(DEMO)/finetune

# -n 2: two pytest workers (tests pin torch to one thread each), about 1.5x faster on 2 cores
test: venv $(VENV)/.runtimes
	$(BIN)/python -m pytest -q -n 2

# The numeric tests again on the kernels of an AVX2 CPU, whatever this CPU has (AVX-512, VNNI, AMX):
# torch's own kernels (ATEN_CPU_CAPABILITY) and oneDNN's, in torch and in OpenVINO (ONEDNN_MAX_CPU_ISA).
# onnxruntime and XNNPACK (LiteRT, ExecuTorch) have no such switch and run this CPU's kernels.
test-avx2: venv $(VENV)/.runtimes
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -q -n 2 -m numeric

# The device package on ARM64 (Debian arm64 under qemu-user-static; root, and about 20 minutes the
# first time): files exported here give the same top-1 there (docs/export.md, "ARM64")
ARM64_ROOT ?= $(CACHE)/../arm64-bookworm
arm64-check: venv $(VENV)/.runtimes
	command -v qemu-aarch64-static >/dev/null && command -v debootstrap >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq qemu-user-static debootstrap >/dev/null)
	$(BIN)/python scripts/arm64_check.py --out runs/arm64_check --root $(ARM64_ROOT)

# On a machine with a CUDA GPU: tests, step throughput and memory, an equal-budget kNN; about 8 minutes.
# GPU_PY=python3: a Python that already has a CUDA torch (a GPU image without the pinned wheels),
# with this repo on its path instead of the venv.
GPU_PY ?=
ifeq ($(GPU_PY),)
gpu-check: venv
	$(BIN)/python scripts/gpu_check.py --out runs/gpu_check
else
gpu-check:
	PYTHONPATH=$(CURDIR):$(CURDIR)/export $(GPU_PY) scripts/gpu_check.py --out runs/gpu_check
endif

clean:
	rm -rf $(VENV) runs .pytest_cache
