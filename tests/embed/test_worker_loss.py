"""A dask worker process killed (SIGKILL) mid-run: the scheduler reruns the blocks it was running or
held (its nanny starts a new process), and the store ends bit-identical to a single-process run."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import zarr

from terrafm.embed import embed
from test_resume_distributed import _arrays, _model


def _blocks_done(path) -> int:
    try:
        return int(np.asarray(zarr.open_group(str(path), mode="r")["blocks_done"][...]).sum())
    except Exception:   # the store is not there yet, or its layout is being written
        return 0


def test_a_killed_worker_is_replaced_and_the_store_equals_one_process(tmp_path, local_cluster):
    import distributed
    import torch
    from embed_helpers import make_dataset

    ds = make_dataset(height=192, width=224, times=2).chunk({"y": 64, "x": 64})
    # 2 x 2 chips a block: 12 blocks a date, 24 in all (one-chip blocks made 84 cluster tasks at
    # ~0.24 s each on a busy machine, 3-4x the same block in one process: most of the run)
    kw = dict(chip_size=64, overlap=16, block_chips=2, batch_size=1, device="cpu", progress=False)
    out = tmp_path / "cluster.zarr"
    killed = {}

    def kill_one_worker_after_the_first_block(pids):
        deadline = time.time() + 300
        while time.time() < deadline:
            done = _blocks_done(out)
            if done >= 1:
                address = sorted(pids)[0]
                killed.update(address=address, pid=pids[address], done=done)
                os.kill(pids[address], signal.SIGKILL)
                return
            time.sleep(0.01)

    with distributed.Client(local_cluster) as client:   # two single-threaded worker processes
        client.wait_for_workers(2, timeout=120)
        pids = client.run(os.getpid)
        killer = threading.Thread(target=kill_one_worker_after_the_first_block, args=(pids,), daemon=True)
        killer.start()
        stored = embed(ds, model=_model(), client=client, out=out, **kw)
        killer.join(timeout=10)
        pids_after = set(client.run(os.getpid).values())   # the workers alive now (the nanny restarts the killed one)
        total = stored.sizes["time"] * int(np.prod(zarr.open_group(str(out), mode="r")["blocks_done"].shape[1:]))
    assert killed, "no block finished before the deadline"
    assert killed["done"] < total, f"the run had finished ({killed['done']} of {total} blocks) before the kill"
    assert killed["pid"] not in pids_after and pids_after

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as in the workers (one thread each): kernels may split work per thread count
    try:
        embed(ds, model=_model(), out=tmp_path / "single.zarr", **kw)
    finally:
        torch.set_num_threads(threads)
    a, b = _arrays(out), _arrays(tmp_path / "single.zarr")
    assert a["blocks_done"].all()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
