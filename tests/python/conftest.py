"""Shared fixtures: every parity test runs on CPU, and on CUDA when a GPU is visible."""
import pytest
import torch

import bisup

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and bisup.has_cuda_kernels() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def one_thread():
    """One intra-op thread: modules of many tiny tensor ops run ~10x faster so on a busy 2-core box
    (a second thread only spins). Use with pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gen():
    """A seeded generator so every test's random data is reproducible."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def op_calls(monkeypatch):
    """Tq of every fused bisup.ops.attention call made by bisup's attention implementation."""
    import bisup.nn.attention as bisup_attention

    calls = []
    real = bisup_attention.ops.attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape[2])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(bisup_attention.ops, "attention", counting)
    return calls


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's shape filled with a value no kernel should produce (NaN / -1 bytes)."""
    if t.is_floating_point():
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, -1 if t.dtype.is_signed else 0xAB)


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (model-sized) run only with BISUP_SLOW=1 (`make test-slow`)."""
    import os

    if os.environ.get("BISUP_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="model-sized; run with BISUP_SLOW=1 (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
