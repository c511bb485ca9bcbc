# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create .venv inside the repo and install what they need; every pip call goes through one
# constraints file so no later install can swap in another torch.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv demo test test-gpu clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" "setuptools<81" wheel
	$(PY) -m pip install -q "torch===2.13.0" "torchvision==0.28.0" "triton==3.7.1"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -c "import attnzoo, timm, torch, triton; print('attnzoo', attnzoo.__version__, '| torch', torch.__version__, '| timm', timm.__version__, '| triton', triton.__version__)"
	touch $@

demo: venv
	@# Fashion-MNIST offline from Debian's dataset-fashion-mnist (MIT); without apt, torchvision downloads it.
	@if [ ! -f data/FashionMNIST/raw/train-images-idx3-ubyte ] && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1 \
	    && command -v apt-get >/dev/null; then \
	  echo "installing dataset-fashion-mnist (apt)"; SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist \
	    || echo "apt-get failed: torchvision's downloader will fetch Fashion-MNIST instead"; fi
	$(PY) tools/train.py --config configs/demo/fashion_mnist.yaml --dataset-download
	$(PY) tools/validate.py --dataset torch/fashion_mnist --data-dir data --checkpoint output/demo/last.pth.tar

test: venv
	$(PY) -m pytest -n 2 --durations=15 tests

test-gpu: venv
	$(PY) -m pytest -m gpu tests

clean-venv:
	rm -rf $(VENV)
