# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create .venv inside the repo and install what they need; every pip call goes through one
# constraints file so no later install can swap in another torch.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv dense fashion-mnist demo finetune test test-gpu clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" "setuptools<81" wheel
	$(PY) -m pip install -q "torch===2.13.0" "torchvision==0.28.0" "triton==3.7.1"
	$(PY) -m pip install -q -e ".[dev,export]"
	$(PY) -c "import attnzoo, timm, torch, triton; print('attnzoo', attnzoo.__version__, '| torch', torch.__version__, '| timm', timm.__version__, '| triton', triton.__version__)"
	touch $@

# Fashion-MNIST offline from Debian's dataset-fashion-mnist (MIT); without apt, torchvision downloads it for
# training (the pasted detection/segmentation sets of `make finetune` need the package).
fashion-mnist:
	@if [ ! -f data/FashionMNIST/raw/train-images-idx3-ubyte ] && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1 \
	    && command -v apt-get >/dev/null; then \
	  echo "installing dataset-fashion-mnist (apt)"; SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist \
	    || echo "apt-get failed: torchvision's downloader will fetch Fashion-MNIST instead"; fi

demo: venv fashion-mnist
	@# a second `make demo` continues (or, when finished, just re-validates) the run in output/demo
	$(PY) tools/train.py --config configs/demo/fashion_mnist.yaml --dataset-download \
	  $$([ -f output/demo/last.pth.tar ] && echo --resume output/demo/last.pth.tar)
	$(PY) tools/validate.py --dataset torch/fashion_mnist --data-dir data --checkpoint output/demo/last.pth.tar

# The 'dense' extra (mmdet 3.x / mmseg 1.x). mmcv 2.1.0 has no prebuilt wheel for this torch: build it once
# (11 min on an idle 2-core machine, ~25 busy) into a cache outside the repo and reuse it. setuptools<81
# (pkg_resources) and -O2 are required; CFLAGS replaces Python's own flags, which projected over 40 min.
MMCV_WHEELS := $(HOME)/.cache/attnzoo/wheels

dense: $(VENV)/.dense-installed

$(VENV)/.dense-installed: $(VENV)/.installed
	$(PY) -m pip install -q ninja wheel "setuptools<81" "mmengine==0.10.7"
	@tag=$$($(PY) -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")'); \
	if ! ls $(MMCV_WHEELS)/mmcv-2.1.0-$$tag-*.whl >/dev/null 2>&1; then \
	  echo "building mmcv 2.1.0 (once) into $(MMCV_WHEELS)"; mkdir -p $(MMCV_WHEELS); \
	  MMCV_WITH_OPS=1 MAX_JOBS=$${MAX_JOBS:-2} CFLAGS="-O2 -g0 -DNDEBUG -fwrapv" \
	    $(PY) -m pip wheel -q --no-build-isolation --no-deps mmcv==2.1.0 -w $(MMCV_WHEELS) || exit 1; fi; \
	$(PY) -m pip install -q $(MMCV_WHEELS)/mmcv-2.1.0-$$tag-*.whl -e ".[dense]"
	$(PY) -c "import mmcv, mmdet, mmseg; from mmcv.ops import nms; print('mmcv', mmcv.__version__, '| mmdet', mmdet.__version__, '| mmseg', mmseg.__version__)"
	touch $@

# Pretraining on Fashion-MNIST, then Mask R-CNN and UPerNet fine-tuned from it (README "Fine-tuning for detection
# and segmentation"); FINETUNE_ARGS="--model nat_tiny --schedule full" on a GPU.
finetune: venv dense fashion-mnist
	$(PY) tools/finetune.py --pretrain-args=--dataset-download $(FINETUNE_ARGS)

test: venv dense
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 --dist worksteal --durations=15 tests

test-gpu: venv
	$(PY) -m pytest -m gpu tests

clean-venv:
	rm -rf $(VENV)
