"""CPU threads per process: an explicit choice wins, else the cores shared by the node's processes."""

import torch

from cepo.threads import available_cores, choose_threads, configure_threads


def test_choice_of_threads():
    assert choose_threads(3, cores=8, local_world_size=2, omp_env="1") == (3, "cpu_threads option")
    assert choose_threads(0, cores=8, local_world_size=2, omp_env="2")[0] == 2
    assert choose_threads(0, cores=8, local_world_size=2, omp_env=None)[0] == 4
    assert choose_threads(0, cores=2, local_world_size=2, omp_env=None)[0] == 1
    assert choose_threads(0, cores=2, local_world_size=4, omp_env="")[0] == 1   # never 0
    assert choose_threads(0, cores=6, local_world_size=1, omp_env="junk")[0] == 6


def test_configure_threads_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    try:
        threads, why = configure_threads(0)
        assert threads == available_cores() == torch.get_num_threads() and "core" in why
        assert configure_threads(1)[0] == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
