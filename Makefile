# Two commands do all the set-up on a fresh machine:
#   make demo   builds the tiny Flux artifact, loads it into its pipeline and writes artifacts/demo.png
#   make test   runs the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Exact pins for a reproducible environment; torch==2.13.0 is the CPU wheel (an unpinned torch pulls CUDA).
PINS := torch==2.13.0 torchao==0.18.0 diffusers==0.42.1 transformers==5.24.0 accelerate==1.15.0 \
        safetensors==0.8.0 click==8.5.1 huggingface_hub==2.4.0 pillow==13.0.0 psutil==7.2.2 \
        pytest==9.2.0 pytest-xdist==3.8.0 execnet==2.1.2 hypothesis==6.170.17 peft==0.21.2 imageio==2.38.1 imageio-ffmpeg==0.8.1 matplotlib==3.11.2 \
        model-signing==1.1.1 pyOpenSSL==26.4.0 cryptography==50.0.2 sigstore==4.5.1 sigstore-models==0.0.6 \
        sigstore-rekor-types==0.0.18 in-toto-attestation==0.9.3 blake3==1.0.11 rfc3161-client==1.0.9 rfc8785==0.1.4 \
        tuf==7.0.1 securesystemslib==1.6.0 protobuf==7.36.2 id==1.6.1 PyJWT==2.15.1 platformdirs==4.14.8 \
        dnspython==2.9.2 email-validator==2.4.0 asn1crypto==1.5.1 cffi==2.1.1 pycparser==3.12

.PHONY: install demo test test-fast bench clean gpu-check gpu-wheels

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PINS)
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

demo: install
	dir=$$($(BIN)/aotpack build tiny-flux --quant int8wo --overwrite) && \
	$(BIN)/aotpack inspect "$$dir" && \
	$(BIN)/aotpack run "$$dir" --prompt "a dog surfing on the moon" --out artifacts/demo.png

# Two test processes: the compiler is mostly single-threaded Python, so two keep both cores busy; they share
# the tiny artifacts and the compile cache (tests/conftest.py).
test: install
	$(BIN)/python -m pytest -q -n 2

# Real-width side-by-side bench (eager / torch.compile / + freezing / + portable cache / aotpack / aotpack-regional): ~50 minutes
# on 2 cores (builds included); results in artifacts/bench/flux-blocks-<platform>/ (.md, .csv, .json, .png).
bench: install
	$(BIN)/aotpack bench flux-blocks --quant none --quant int8dq --quant int8wo --quant auto

test-fast: install
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

clean:
	rm -rf artifacts/*/ artifacts/.*partial* .pytest_cache

# The GPU check (scripts/gpu_check.py) for a lent H100/H200: no venv and no network there, so no `install`
# prerequisite; the system python3 runs aotpack from this working tree. OUT=DIR picks the results folder.
gpu-check:
	$(PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS) "$(or $(OUT),artifacts/gpu-check)"

# The wheels the GPU machines lack, for linux x86_64 CPython 3.12 (abi3 / pure Python) whatever this machine
# is; they travel with the working tree in .whl/ (`carry: [".whl"]`).
GPU_WHEELS := diffusers==0.42.1 torchao==0.18.0
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d .whl \
	  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform any $(GPU_WHEELS)
