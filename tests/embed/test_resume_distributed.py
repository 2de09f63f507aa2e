"""kill -9 mid-run then resume gives the identical zarr, with the public release's layout (no fusion
parameters: the deterministic mean fusion); a dask LocalCluster equals one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zarr

from terrafm.embed import EMBEDDING_VAR, embed

HERE = Path(__file__).parent
SIDE = 384       # 6 x 6 chips of 96 px (stride 64) per date: 72 one-chip blocks over the two dates
KILL_AFTER = 12  # blocks stored before the kill: the other 60 leave the child seconds to live
SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
from embed_helpers import make_dataset
from terrafm.embed import embed
from terrafm.model import create_model
torch.set_num_threads(1)
torch.manual_seed(0)
model = create_model("terrafm_tiny", weights=sys.argv[2], seed=1).eval()
SIDE = int(sys.argv[3])
ds = make_dataset(height=SIDE, width=SIDE, times=2, s1=True).chunk({{"y": 128, "x": 128}})
embed(ds, model=model, chip_size=96, overlap=16, block_chips=1, batch_size=1, device="cpu",
      progress=False, out=sys.argv[1])
"""


def _run_kw():
    return dict(chip_size=96, overlap=16, block_chips=1, batch_size=1, device="cpu", progress=False)


def _model(weights=None, seed=0):
    from terrafm.model import create_model

    return create_model("terrafm_tiny", weights=weights, seed=seed).eval()


def _release_layout(tmp_path):
    """A release-layout checkpoint: every parameter but the fusion's (as the public TerraFM-B)."""
    import torch

    state = _model(seed=7).state_dict()
    path = tmp_path / "release_layout.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("patch_embed.fusion.")}, path)
    return path


def _dataset():
    from embed_helpers import make_dataset

    return make_dataset(height=SIDE, width=SIDE, times=2, s1=True).chunk({"y": 128, "x": 128})


def _arrays(path):
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(group[name][...]) for name in (EMBEDDING_VAR, "valid", "valid_s1", "valid_s2_l2a", "blocks_done")}


def test_kill9_then_resume_is_bit_identical(tmp_path):
    out = tmp_path / "killed.zarr"
    weights = _release_layout(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(here=str(HERE)), str(out), str(weights), str(SIDE)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    done = 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "blocks_done").is_dir():   # zarr format 2 or 3: the array's folder exists
            try:
                done = int(np.asarray(zarr.open_group(str(out), mode="r")["blocks_done"][...]).sum())
            except Exception:
                done = 0
            if done >= KILL_AFTER:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _arrays(out)["blocks_done"]
    assert 0 < partial.sum() < partial.size, partial.sum()

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed run: kernels may split work differently per thread count
    try:
        # another process, another seed: the fusion the file lacks is the parameter-free mean, not a draw
        resumed = embed(_dataset(), model=_model(weights, seed=2), out=out, **_run_kw())
        reference = embed(_dataset(), model=_model(weights, seed=3), out=tmp_path / "clean.zarr", **_run_kw())
    finally:
        torch.set_num_threads(threads)
    a, b = _arrays(out), _arrays(tmp_path / "clean.zarr")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert a["blocks_done"].all()
    np.testing.assert_array_equal(resumed.values, reference.values)
    assert resumed.attrs["fusion"] == "mean"


def test_local_cluster_equals_single_process(tmp_path, local_cluster):
    import distributed
    from embed_helpers import make_dataset

    ds = make_dataset(height=192, width=224, times=1).chunk({"y": 64, "x": 64})
    kw = dict(chip_size=64, overlap=16, block_chips=2, batch_size=4, device="cpu", progress=False)
    single = embed(ds, model=_model(), **kw)
    with distributed.Client(local_cluster) as client:   # two single-threaded worker processes
        client.wait_for_workers(2, timeout=120)
        spread = embed(ds, model=_model(), client=client, **kw)
        stored = embed(ds, model=_model(), client=client, out=tmp_path / "d.zarr", **kw)
        workers = client.run(lambda: sorted(__import__("terrafm.embed").embed._WORKER_MODELS))
    np.testing.assert_allclose(spread.values, single.values, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(spread.valid.values, single.valid.values)
    np.testing.assert_array_equal(stored.values, spread.values)
    assert len(workers) == 2
