"""Suite-wide setup: Triton's interpreter on machines without CUDA, and the gpu marker.

Triton picks the interpreter when a kernel is decorated, so TRITON_INTERPRET must be set before
``attnzoo.kernels`` is imported; this module is imported before any test module.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# the cores shared among pytest-xdist's workers (one intra-op thread each on two cores: two each oversubscribed them),
# and the same count for the tools the tests start as subprocesses
THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
torch.set_num_threads(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)


def pytest_collection_modifyitems(config, items):
    # the tests marked slow (30 s and more on two CPU cores) first: under pytest-xdist the workers then finish on
    # short tests instead of one waiting for the other's last long one (same order on every worker)
    items.sort(key=lambda item: "slow" not in item.keywords)
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: run `make test-gpu` on a GPU machine")
    skip_interp = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 set before attnzoo.kernels is imported")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "triton_interpret" in item.keywords and not TRITON_INTERPRET:
            item.add_marker(skip_interp)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
