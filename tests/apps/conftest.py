import pytest
import torch


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own empty directory: a default --out (runs/...) or --data (data/listops) never
    meets the runs of the README's main job, nor another test's under pytest-xdist."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def one_thread():
    """Two OpenMP threads on a busy 2-core machine can be 50x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
