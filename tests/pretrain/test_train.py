"""End-to-end tiny runs on real patches: learning without collapse, exact resume, 2-rank Gloo
equivalence, export -> strict load -> same features, refusal to resume another config."""

import contextlib
import copy
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.export import export_teacher
from pretrain.head import build_student_teacher
from pretrain.train import train

ROOT = Path(__file__).resolve().parents[2]
# Smoke recipe for 30 steps of batch 8: no warm-ups (they would take the whole run), a fixed sharp
# teacher temperature for the small K, a fast center, and teacher momentum 0.9995, DINO's advice
# for small batches (its --momentum_teacher help: "use 0.9995 with batch size of 256").
SMOKE = ["model.out_dim=64", "model.drop_path_rate=0.1", "optim.base_lr=0.05",
         "optim.momentum_teacher=0.9995", "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0",
         "optim.warmup_teacher_temp_epochs=0", "optim.teacher_temp=0.01", "optim.center_momentum=0.5"]


@contextlib.contextmanager
def one_torch_thread():
    """terrafm_tiny on batches of 8 small crops: a second OpenMP thread buys nothing and, on a busy
    2-core runner, its spinning slows the run several times. The 30-iteration run took 19.0 s
    wall / 18.7 s CPU with one thread, 21.1 s / 26.6 s with two (load ~1), 145 s / 115 s with
    two on a machine shared by three jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


def tiny_overrides(majortom, out: Path, extra=()) -> list[str]:
    root = majortom["root"]
    return [f"data.root={root}", f"data.cell_stats={root / 'cell_stats.csv'}", f"run.output_dir={out}",
            *SMOKE, *extra]


@pytest.fixture(scope="session")
def full_run(majortom, tmp_path_factory):
    out = tmp_path_factory.mktemp("full_run")
    cfg = load_config("tiny_cpu", tiny_overrides(majortom, out, [f"data.knn_root={majortom['root'] / 'knn'}",
                                                                "run.knn_every=30"]))
    with one_torch_thread():
        losses = train(cfg, resume=None)
    return {"cfg": cfg, "losses": losses, "out": out}


def test_tiny_run_learns_without_collapse(full_run):
    """The DINO loss itself (teacher-student cross-entropy) falls over 30 steps on real patches.

    loss = H(teacher) + KL(teacher || student). Step 1 is scored against an uncentered teacher
    (c = c_h = 0), which is nearly one-hot (entropy ~0.1 nats), so the loss jumps at step 2 as the
    centers start to act, and H(teacher) keeps rising while the teacher's outputs spread over the
    K dims. Hence means over 10 steps: with teacher momentum 0.9995 (DINO's small-batch value) the
    last 10 losses were 0.84-0.87x the first 10 for seeds 0-3 (e.g. seed 0: 3.74 -> 3.13), while
    with momentum 0.996 the same comparison rises (3.47 -> 3.92) because the teacher drifts faster
    than the student catches up. The part the student minimises, KL = loss - H(teacher), must fall
    too, and the teacher must neither collapse to one dim (H ~ 0) nor to uniform (H ~ log K).
    """
    losses = np.array(full_run["losses"])
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert losses[-10:].mean() < 0.95 * losses[:10].mean(), losses
    metrics = pd.read_csv(full_run["out"] / "metrics.csv")
    entropy = metrics[metrics.name == "teacher_entropy"].value.to_numpy()
    assert len(entropy) == 30
    kl = losses - entropy
    assert kl[-10:].mean() < 0.75 * kl[:10].mean(), kl
    log_k = math.log(64)
    assert 0.05 * log_k < entropy[-5:].mean() < 0.9 * log_k, entropy
    knn = metrics[metrics.name == "knn_top1"].value.to_numpy()
    assert len(knn) == 1 and 0.0 <= knn[0] <= 1.0


def test_resume_reproduces_the_uninterrupted_losses(full_run, majortom, tmp_path):
    """Stopped at 7 (mid-epoch: 3 iterations per epoch; not a checkpoint_every multiple), resumed
    across the checkpoint at 10 and two epoch boundaries: the losses are the uninterrupted run's.
    Any state the checkpoint lost (optimizer, centers, schedules, RNG, sampler position) shows at
    the first resumed step; 16 of the 30 iterations keep the test to half a run."""
    cfg = load_config("tiny_cpu", tiny_overrides(majortom, tmp_path / "split", [f"data.knn_root={majortom['root'] / 'knn'}",
                                                                               "run.knn_every=30"]))
    first = train(cfg, resume="auto", stop_after=7)
    assert (tmp_path / "split" / "checkpoint.pth").exists()
    second = train(cfg, resume="auto", stop_after=16)
    assert len(first) == 7 and len(second) == 9
    np.testing.assert_allclose(first + second, full_run["losses"][:16], rtol=1e-6, atol=1e-7)


def test_resume_refuses_a_checkpoint_of_another_config(full_run, majortom, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(full_run["out"], out)
    cfg = load_config("tiny_cpu", tiny_overrides(majortom, out, ["optim.base_lr=0.07"]))
    with pytest.raises(ConfigError, match="written by a run with another config"):
        train(cfg, resume="auto")


def test_checkpoints_load_with_weights_only(full_run):
    """What a run writes holds no pickled code: torch.load(weights_only=True) reads it back."""
    state = torch.load(full_run["out"] / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert state["iteration"] == 30 and state["fingerprint"] == full_run["cfg"].fingerprint()
    assert all(type(g["lr"]) is float for g in state["optimizer"]["param_groups"])
    rng = torch.load(full_run["out"] / "rng_rank0.pth", map_location="cpu", weights_only=True)
    assert rng["numpy"]["keys"].dtype == torch.int64 and rng["numpy"]["keys"].shape == (624,)
    assert len(rng["python"]["internal"]) == 625


class _CreatesMarker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_refuses_a_crafted_rng_file_without_running_it(full_run, tmp_path):
    from terrafm.model import CheckpointError

    out = tmp_path / "run"
    shutil.copytree(full_run["out"], out)
    marker = tmp_path / "marker"
    torch.save({"torch": torch.get_rng_state(), "numpy": _CreatesMarker(marker), "python": []}, out / "rng_rank0.pth")
    cfg = copy.deepcopy(full_run["cfg"])
    cfg.run.output_dir = str(out)
    with pytest.raises(CheckpointError, match=r"rng_rank0\.pth is not a checkpoint pretrain\.train wrote.*\(io\.open\)"
                                              r".*never unpickles code"):
        train(cfg, resume="auto")
    assert not marker.exists()


def _write_older_format(run: Path) -> None:
    """Rewrite a run's files the way pretrain.train wrote them before weights_only=True:
    numpy float64 learning rates and numpy/Python RNG state tuples."""
    import numpy as np

    state = torch.load(run / "checkpoint.pth", map_location="cpu", weights_only=True)
    for i, group in enumerate(state["optimizer"]["param_groups"]):
        group["lr"] = np.float64(group["lr"])
        if i == 0:
            group["weight_decay"] = np.float64(group["weight_decay"])
    torch.save(state, run / "checkpoint.pth")
    rng = torch.load(run / "rng_rank0.pth", map_location="cpu", weights_only=True)
    n, p = rng["numpy"], rng["python"]
    torch.save({"torch": rng["torch"],
                "numpy": (n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                          n["cached_gaussian"]),
                "python": (p["version"], tuple(p["internal"]), p["gauss_next"])}, run / "rng_rank0.pth")


def test_an_older_checkpoint_is_refused_with_the_upgrade_which_then_resumes_exactly(full_run, majortom, tmp_path):
    from pretrain.train import main as train_main
    from terrafm.model import CheckpointError

    run = tmp_path / "old"
    cfg = load_config("tiny_cpu", tiny_overrides(majortom, run, [f"data.knn_root={majortom['root'] / 'knn'}",
                                                                "run.knn_every=30"]))
    first = train(cfg, resume="auto", stop_after=3)
    _write_older_format(run)
    old = {name: (run / name).read_bytes() for name in ("checkpoint.pth", "rng_rank0.pth")}
    with pytest.raises(CheckpointError, match=r"checkpoint\.pth was written by an older pretrain\.train.*"
                                              rf"python -m pretrain\.train --upgrade-checkpoint {run}"):
        train(cfg, resume="auto")
    assert {name: (run / name).read_bytes() for name in old} == old
    assert train_main(["--upgrade-checkpoint", str(run)]) == 0
    assert {name: (run / f"{name}.old-format").read_bytes() for name in old} == old
    second = train(cfg, resume="auto", stop_after=6)
    np.testing.assert_allclose(first + second, full_run["losses"][:6], rtol=1e-6, atol=1e-7)
    assert train_main(["--upgrade-checkpoint", str(run)]) == 0  # already plain: nothing to do
    assert sorted(p.name for p in run.glob("*.old-format")) == ["checkpoint.pth.old-format", "rng_rank0.pth.old-format"]


def test_export_loads_strictly_and_matches_the_teacher(full_run, tmp_path):
    from terrafm.model import create_model, load_weights

    path = export_teacher(full_run["out"] / "checkpoint.pth", tmp_path / "tiny_export.pth")
    model = create_model("terrafm_tiny").eval()
    result = load_weights(model, path)
    assert result.fusion_trained and not result.missing_fusion
    state = torch.load(full_run["out"] / "checkpoint.pth", weights_only=True)
    m = full_run["cfg"].model
    _, teacher = build_student_teacher("terrafm_tiny", dict(out_dim=m.out_dim, hidden_dim=m.hidden_dim,
                                                            bottleneck_dim=m.bottleneck_dim))
    teacher.load_state_dict(state["teacher"])
    teacher.eval()
    torch.manual_seed(0)
    x = {"s2_l2a": torch.rand(2, 12, 48, 48), "s1": torch.rand(2, 2, 48, 48)}
    masks = {"s1": torch.rand(2, 48, 48) > 0.3}
    with torch.no_grad():
        ours, ref = model(x, masks), teacher.backbone(x, masks)
    torch.testing.assert_close(ours.cls, ref.cls, rtol=0, atol=0)
    torch.testing.assert_close(ours.patch, ref.patch, rtol=0, atol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_matches_one_process(majortom, tmp_path):
    # no drop path: its random masks are drawn per rank, everything else is rank-independent
    extra = ["model.drop_path_rate=0.0", "optim.epochs=2"]
    single = train(load_config("tiny_cpu", tiny_overrides(majortom, tmp_path / "one", extra)), resume=None)
    args = [f"--set={o}" for o in tiny_overrides(majortom, tmp_path / "two", extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "pretrain.train", "--config", "tiny_cpu",
           "--resume", "none", "--losses-out", str(tmp_path / "two_losses.txt"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [float(v) for v in (tmp_path / "two_losses.txt").read_text().split()]
    assert len(two) == len(single) == 6
    np.testing.assert_allclose(two, single, rtol=2e-4, atol=1e-5)
