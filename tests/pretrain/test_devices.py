"""One device per torchrun process: the choice of device from LOCAL_RANK with a faked CUDA device
count (this machine has no GPU), the refusals, and setup_device making it the current device.
The real 2-rank Gloo run is test_train.py::test_two_process_gloo_run_matches_one_process."""

import pytest
import torch

from pretrain.train import setup_device
from terrafm.model.device import device_for_rank, process_group_backend


def test_each_local_rank_of_a_gpu_node_takes_its_own_gpu(monkeypatch):
    chosen = []
    for rank in range(8):
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
        chosen.append(device_for_rank("auto", cuda_count=8))
    assert [d.type for d in chosen] == ["cuda"] * 8
    assert [d.index for d in chosen] == list(range(8))
    # "cuda" without an index is the same per-rank choice; fewer ranks than GPUs use the first ones
    assert [device_for_rank("cuda", r, 2, cuda_count=4).index for r in range(2)] == [0, 1]
    assert all(process_group_backend(d) == "nccl" for d in chosen)


def test_a_process_seeing_one_gpu_takes_cuda0_and_cpu_ranks_use_gloo():
    # one CUDA_VISIBLE_DEVICES entry per process (e.g. SLURM --gpus-per-task=1): every rank's GPU is cuda:0
    assert [device_for_rank("auto", r, 4, cuda_count=1) for r in range(4)] == [torch.device("cuda", 0)] * 4
    cpu = [device_for_rank("auto", r, 2, cuda_count=0) for r in range(2)]
    assert cpu == [torch.device("cpu")] * 2 or all(d.type == "mps" for d in cpu)
    assert device_for_rank("cpu", 1, 2, cuda_count=8) == torch.device("cpu")
    assert process_group_backend(torch.device("cpu")) == "gloo"
    # an explicit device of a single process is kept as asked
    assert device_for_rank("cuda:3", 0, 1, cuda_count=4) == torch.device("cuda", 3)
    assert device_for_rank(2, cuda_count=4, local_rank=0, local_world_size=1) == torch.device("cuda", 2)


def test_launcher_setting_local_rank_only(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert device_for_rank("auto", cuda_count=4) == torch.device("cuda", 3)


@pytest.mark.parametrize("args, match", [
    (("auto", 0, 3, 2), r"3 processes on this node but it has 2 CUDA devices.*--nproc_per_node=2"),
    (("cuda:0", 1, 2, 2), r"would put all 2 processes of this node on cuda:0; pass device='auto'"),
    ((1, 0, 2, 2), r"would put all 2 processes"),
    (("auto", 2, 2, 2), r"local rank 2 is outside 0\.\.1"),
    (("cuda:4", 0, 1, 4), r"CUDA device 4 but this process sees 4 \(cuda:0 to cuda:3\)"),
    (("cuda", 0, 1, 0), r"CUDA is not available"),
])
def test_refused_choices_name_the_fix(args, match):
    device, rank, world, count = args
    with pytest.raises((ValueError, RuntimeError), match=match):
        device_for_rank(device, rank, world, cuda_count=count)


def test_setup_device_makes_the_rank_gpu_current_before_the_group(monkeypatch):
    # no GPU here: torch is told there are 4, and set_device records instead of touching a driver
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.delenv("WORLD_SIZE", raising=False)   # no process group: only the device choice runs
    assert setup_device("auto") == (torch.device("cuda", 2), 0, 1)
    assert current == [torch.device("cuda", 2)]


def test_setup_device_alone_on_cpu(monkeypatch):
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert setup_device("cpu") == (torch.device("cpu"), 0, 1)
