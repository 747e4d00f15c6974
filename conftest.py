"""Fixtures every test file may use; the builders behind them live in tiny.py."""

import pytest
import torch

import tiny


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test model is tiny: one thread is as fast, forked children never meet a half-started
    thread pool, and on a busy CPU a parallel op no longer waits for a starved thread (a tiny
    transformer forward: 3 ms on one thread, 480 ms on two at load 3)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """(repository folder, manifest, latent cache) of tiny.make_training_repo."""
    root = tmp_path_factory.mktemp("klein")
    manifest, cache = tiny.make_training_repo(root)
    return root, manifest, cache


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: runs torch.compile with Inductor and the system C++ compiler (slow on a CPU; "
                                       "-m 'not compile' skips it)")  # fmt: skip
