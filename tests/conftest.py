import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_pyro():
    """Every test starts with an empty param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def one_thread():
    """Tiny networks: thread hand-offs dominate on a loaded machine, so use one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def sigint_on_call(fn, k: int):
    """``fn`` wrapped so that its ``k``-th call first sends this process SIGINT (a user's Ctrl-C
    at a known point of a training loop)."""
    import os
    import signal

    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            os.kill(os.getpid(), signal.SIGINT)
        return fn(*args, **kwargs)

    return wrapped
