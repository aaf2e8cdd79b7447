"""Shared fixtures.  Nothing here touches a GPU at import time; GPU tests skip through the ``gpu`` marker."""

import pytest
import torch

from lora_kernels import settings
from lora_kernels._backend import HAS_TRITON, interpreter_enabled
from lora_kernels.ops.lora_linear import dispatch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped cleanly without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def triton_available_on_cpu() -> bool:
    return HAS_TRITON and interpreter_enabled()


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    """Run a CPU test on the Triton kernels (interpreter) and on the pure-PyTorch path."""
    if request.param == "triton" and not triton_available_on_cpu():
        pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1 set before import")
    if request.param == "torch":
        monkeypatch.setattr(dispatch, "use_triton", lambda t: False)
    return request.param


@pytest.fixture
def kernels():
    """A CPU test of a kernel detail (grid, arrangement): only meaningful on the Triton kernels themselves."""
    if not triton_available_on_cpu():
        pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1 set before import")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element the kernels never write fails the comparison."""
    def poisoned(shape, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    if dispatch.launch is not None:
        monkeypatch.setattr(dispatch.launch, "_empty", poisoned)


@pytest.fixture(autouse=True)
def _fresh_settings():
    """A test that changes a LORA_KERNELS_* variable (monkeypatch.setenv + settings.reload()) leaves no trace."""
    yield
    settings.reload()
