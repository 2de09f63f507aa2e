"""One device per dask worker and CUDA indices: the choice with faked CUDA device counts (this
machine has no GPU), then a real cluster: two workers advertising GPU=1 plus one without, each
GPU worker on the device of an explicit list (CPU devices "cpu:0"/"cpu:1" stand for GPUs), the
worker without the resource given no block, and a device a worker lacks refused before any block."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from terrafm.embed import embed, worker_devices
from terrafm.model.device import resolve_device


# ---------------------------------------------------------------------- resolve_device
def test_resolve_device_takes_an_index_and_refuses_one_it_cannot_see():
    assert resolve_device(0, cuda_count=1) == torch.device("cuda", 0)
    assert resolve_device(np.int64(3), cuda_count=4) == torch.device("cuda", 3)
    assert resolve_device("1", cuda_count=2) == torch.device("cuda", 1)
    assert resolve_device("cuda:1", cuda_count=2) == torch.device("cuda", 1)
    assert resolve_device("auto", cuda_count=2) == torch.device("cuda")
    assert resolve_device("cpu", cuda_count=0) == torch.device("cpu")
    with pytest.raises(RuntimeError, match=r"CUDA device 2 but this process sees 2 \(cuda:0 to cuda:1\)"):
        resolve_device(2, cuda_count=2)
    with pytest.raises(RuntimeError, match="CUDA device 1 but this process sees 1"):
        resolve_device(torch.device("cuda", 1), cuda_count=1)
    with pytest.raises(RuntimeError, match="CUDA is not available; use device='cpu'"):
        resolve_device(0, cuda_count=0)
    with pytest.raises(ValueError, match="index -1 is negative"):
        resolve_device(-1, cuda_count=2)
    with pytest.raises(TypeError, match=r"device=True: use 'auto', 'cpu'"):
        resolve_device(True)
    with pytest.raises(TypeError, match=r"device=0\.5 \(float\)"):
        resolve_device(0.5)


def test_resolve_device_asks_torch_when_not_told(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(1) == torch.device("cuda", 1)
    with pytest.raises(RuntimeError, match="sees 2"):
        resolve_device("cuda:2")


# ---------------------------------------------------------------------- worker_devices
A, B, C = "tcp://10.0.0.1:40001", "tcp://10.0.0.1:40002", "tcp://10.0.0.1:40003"
OTHER = "tcp://10.0.0.2:40001"


def test_an_explicit_list_goes_by_sorted_worker_address():
    assert worker_devices([C, A, B], ["cuda:0", "cuda:1", 2]) == {A: "cuda:0", B: "cuda:1", C: "cuda:2"}
    assert worker_devices([B, A], ("cuda:1", "cuda:0")) == {A: "cuda:1", B: "cuda:0"}


def test_more_workers_than_listed_devices_share_them_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="terrafm.embed"):
        chosen = worker_devices([A, B, C], ["cuda:0", "cuda:1"])
    assert chosen == {A: "cuda:0", B: "cuda:1", C: "cuda:0"}
    assert "3 dask workers for 2 devices" in caplog.text


@pytest.mark.parametrize("device, match", [
    ([], "lists no device"),
    (["cuda:0", "cpu"], "mixes device types"),
    (["auto", "cuda:1"], "each entry is one device"),
    ([None], "each entry is one device"),
])
def test_a_bad_device_list_is_refused(device, match):
    with pytest.raises(ValueError, match=match):
        worker_devices([A, B], device)


def test_auto_spreads_workers_that_see_the_same_gpus_of_a_host():
    # LocalCluster(n_workers=4) on a 4-GPU node, no CUDA_VISIBLE_DEVICES: all see cuda:0..3
    four = {f"tcp://10.0.0.1:4000{i}": (4, None) for i in range(4)}
    assert sorted(worker_devices(list(four), "auto", four).values()) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    # the same devices in the same order are the same GPUs too; "cuda" (no index) spreads the same way
    same = {A: (2, "0,1"), B: (2, "0,1")}
    assert worker_devices([A, B], "cuda", same) == {A: "cuda:0", B: "cuda:1"}
    # two hosts: each host's workers are spread over that host's GPUs
    hosts = {A: (2, None), B: (2, None), OTHER: (2, None)}
    assert worker_devices([OTHER, B, A], torch.device("cuda"), hosts) == {A: "cuda:0", B: "cuda:1", OTHER: "cuda:0"}


def test_a_worker_with_its_own_visible_devices_takes_cuda0():
    # dask-cuda's LocalCUDACluster rotates CUDA_VISIBLE_DEVICES: the first listed GPU is the worker's
    rotated = {A: (3, "0,1,2"), B: (3, "1,2,0"), C: (3, "2,0,1")}
    assert worker_devices([A, B, C], "auto", rotated) == {A: "cuda:0", B: "cuda:0", C: "cuda:0"}
    single = {A: (1, "0"), B: (1, "1")}
    assert worker_devices([A, B], "auto", single) == {A: "cuda:0", B: "cuda:0"}


def test_workers_without_cuda_and_explicit_devices_keep_the_device_as_given(caplog):
    assert worker_devices([A, B], "auto", {A: (0, None), B: (0, None)}) == {A: "auto", B: "auto"}
    assert worker_devices([A, B], "cpu") == {A: "cpu", B: "cpu"}
    assert worker_devices([A, B], "cuda:1", {A: (2, None), B: (2, None)}) == {A: "cuda:1", B: "cuda:1"}
    with caplog.at_level(logging.WARNING, logger="terrafm.embed"):
        crowded = worker_devices([A, B, C], "auto", {A: (2, None), B: (2, None), C: (2, None)})
    assert crowded == {A: "cuda:0", B: "cuda:1", C: "cuda:0"}
    assert "see the same 2 GPUs" in caplog.text


def test_a_device_list_needs_a_client(tiny_model):
    from embed_helpers import make_dataset

    with pytest.raises(ValueError, match="lists one device per dask worker; pass client="):
        embed(make_dataset(height=64, width=64), model=tiny_model, chip_size=64, device=["cpu", "cpu"],
              progress=False)


# ---------------------------------------------------------------------- a real cluster
def test_each_gpu_worker_runs_on_its_listed_device_and_others_get_no_block(tmp_path, tiny_model):
    distributed = pytest.importorskip("distributed")
    from distributed import Nanny, Scheduler, SpecCluster
    from embed_helpers import make_dataset

    ds = make_dataset(height=128, width=160, times=1).chunk({"y": 64, "x": 64})
    kw = dict(model=tiny_model, chip_size=64, overlap=16, block_chips=1, batch_size=2, progress=False)
    single = embed(ds, device="cpu", **kw)
    worker = {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}}
    spec = {"gpu-a": worker, "gpu-b": worker, "no-gpu": {"cls": Nanny, "options": {"nthreads": 1}}}
    with SpecCluster(workers=spec, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}}) as cluster, \
            distributed.Client(cluster) as client:
        client.wait_for_workers(3)
        names = {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        stored = embed(ds, device=["cpu:0", "cpu:1"], client=client, out=tmp_path / "spread.zarr", **kw)
        used = client.run(lambda: dict(__import__("terrafm.embed").embed._WORKER_DEVICES))
        # a device the workers lack fails on them, before any block and before the store is made
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            embed(ds, device=["cuda:0", "cuda:1"], client=client, out=tmp_path / "never.zarr", **kw)
        assert not (tmp_path / "never.zarr").exists()
    gpu_workers = sorted(a for a, n in names.items() if n != "no-gpu")
    expected = {a: d for a, d in zip(gpu_workers, ["cpu:0", "cpu:1"])}
    assert {a: list(run.values()) for a, run in used.items() if run} == {a: [d] for a, d in expected.items()}
    assert used[next(a for a, n in names.items() if n == "no-gpu")] == {}
    np.testing.assert_allclose(stored.values, single.values, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stored.valid.values, single.valid.values)
