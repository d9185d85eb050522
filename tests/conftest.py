"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # On a small shared CPU, torch's default thread pool makes tiny ops ~30x slower
    # (measured: 10 tiny training steps 13.8 s with 2 threads vs 0.46 s with 1).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def _keep_freed_memory():
    # As the CLI does (dpdm.memory.keep_freed_memory): the tests run the same code.
    from dpdm.memory import keep_freed_memory

    keep_freed_memory()
