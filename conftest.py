import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test model is tiny: one thread is as fast, forked children never meet a half-started
    thread pool, and on a busy CPU a parallel op no longer waits for a starved thread (a tiny
    transformer forward: 3 ms on one thread, 480 ms on two at load 3)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
