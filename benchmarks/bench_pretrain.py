"""Training-step throughput of TerraFM pretraining against a plain single-modality DINO step.

The setups are the shipped configs, with the batch capped for a CPU: ``tiny`` is
``pretrain/configs/tiny_cpu.yaml`` (terrafm_tiny, S2 L2A + S1, batch 8) and ``base`` is
``pretrain/configs/vitb_paper.yaml`` (TerraFM-B, S2 L2A + S2 L1C + S1, 2 x 224 + 10 x 96 crops,
batch 2). ``tiny_3mod`` is a stress case: the paper's three modalities on terrafm_tiny, whose
stem (3072 -> 192 per token) outweighs its two-block 64-wide trunk, so that the stems modality
augmentation adds weigh most.

All variants use the same backbone, head, optimizer, multi-crop sizes and batch, measured side
by side in one run:

- ``terrafm``: modality augmentation over the config's modalities (per view and sample,
  independent for student and teacher, the config's threshold, selection carried by the masks as
  ``pretrain.train.collate`` builds them; fusion where several are chosen) and the
  dual-centering loss (the config's alpha, half the samples feed c_h);
- ``plain_dino``: S2 L2A only through its stem, the usual single DINO center (``centering="dino"``, c_h
  never fed);
- ``stems_only`` (a diagnostic, not a training mode): ``terrafm``'s inputs and modality choices
  through the same stems, proj1 and norm, but the modality tokens of a position summed instead of
  fused, and the single center. ``stems_only / plain_dino`` is the cost of the work modality
  augmentation adds or saves by itself (with three modalities about 1.6 stems per view instead
  of one, more rows through proj1, two more stems to update); ``terrafm / stems_only`` is the
  cost of the fusion and dual centering.

Each row also gives the matmul/convolution FLOPs per step of every variant and ``flop_bound`` =
plain / terrafm FLOPs, the ratio the two would reach at equal FLOP rates.

A step = teacher forward on 2 globals (the public forward under ``torch.no_grad``, as in training),
student forward on 2 globals + J locals, loss, backward, per-parameter clip, AdamW step, EMA.
Inputs are random normalized tensors generated before timing (a few batches, cycled): data
loading is not timed.

Timing: the variants alternate step by step (ABCABC..., order reversed every round) so that
background load on a shared machine hits them alike; medians over rounds of wall time and of
process CPU time (less sensitive to other processes than wall time) are reported, with the load
average before and after.

Peak memory (``terrafm`` and ``plain_dino``): each variant runs in its own fresh subprocess; after the models, optimizer state
and one warm-up step exist, the kernel's RSS high-water mark is reset (``/proc/self/clear_refs``)
and the peak RSS over the timed steps is read from ``VmHWM``. ``MALLOC_MMAP_THRESHOLD_`` is fixed
in the child so freed tensors go back to the OS and RSS follows the live tensors. On CUDA:
``torch.cuda.max_memory_allocated`` per variant.

    python benchmarks/bench_pretrain.py [--configs tiny base tiny_3mod] [--steps 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

#: setup name -> (shipped config, batch cap on a CPU)
CONFIG_SETUPS = {"tiny": ("tiny_cpu", 8), "base": ("vitb_paper", 2)}
#: not a shipped config: the paper's three modalities on the smallest model
STRESS_SETUPS = {
    "tiny_3mod": dict(model="terrafm_tiny", batch=16, global_size=64, local_size=32, n_local=4,
                      head=(4096, 256, 64), modalities=("s2_l2a", "s2_l1c", "s1"), threshold=0.5,
                      alpha=0.8, drop_path=0.1, source="stress case"),
}
SETUP_NAMES = (*CONFIG_SETUPS, *STRESS_SETUPS)


def get_setup(name: str) -> dict:
    """Model, batch, crops, head (out, hidden, bottleneck), modalities, threshold, alpha, drop path."""
    if name in STRESS_SETUPS:
        return dict(STRESS_SETUPS[name])
    from pretrain.config import load_config

    config_name, cpu_batch = CONFIG_SETUPS[name]
    cfg = load_config(config_name)
    return dict(model=cfg.model.name, batch=min(cfg.optim.batch_size, cpu_batch),
                global_size=cfg.augment.global_size, local_size=cfg.augment.local_size,
                n_local=cfg.augment.n_local, head=(cfg.model.out_dim, cfg.model.hidden_dim, cfg.model.bottleneck_dim),
                modalities=tuple(cfg.data.modalities), threshold=cfg.augment.modality_threshold,
                alpha=cfg.optim.alpha, drop_path=cfg.model.drop_path_rate,
                source=f"pretrain/configs/{config_name}.yaml")


VARIANTS = ("terrafm", "plain_dino", "stems_only")
MEMORY_VARIANTS = ("terrafm", "plain_dino")
ROOT = Path(__file__).resolve().parents[1]
N_BATCHES = 3  # batches built before timing and cycled


def make_batches(setup: dict, variant: str, device: torch.device, n_batches: int = N_BATCHES, seed: int = 0):
    """``n_batches`` (teacher groups, student groups, frequent) tuples, built before timing."""
    from pretrain.augment import select_modalities
    from terrafm.sensors import MODALITIES

    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    batch = setup["batch"]

    def group(n_views: int, size: int):
        n = n_views * batch
        if variant == "plain_dino":
            return {"s2_l2a": torch.rand(n, MODALITIES["s2_l2a"].n_bands, size, size, generator=gen).to(device)}, {}
        chosen = [select_modalities(setup["modalities"], rng, setup["threshold"]) for _ in range(n)]
        inputs, masks = {}, {}
        for key in setup["modalities"]:
            keep = torch.tensor([key in c for c in chosen])
            if keep.any():  # as collate: every sample's crop is stacked, the mask carries the choice
                inputs[key] = torch.rand(n, MODALITIES[key].n_bands, size, size, generator=gen).to(device)
                masks[key] = keep[:, None, None].expand(n, size // 16, size // 16).contiguous().to(device)
        return inputs, masks

    frequent = torch.tensor([variant == "terrafm" and i % 2 == 0 for i in range(batch)], device=device)
    return [([group(2, setup["global_size"])],
             [group(2, setup["global_size"]), group(setup["n_local"], setup["local_size"])],
             frequent) for _ in range(n_batches)]


def _sum_modalities(fusion, values, logits, index, valid, batch):
    """``stems_only``: the packed modality values of each batch row summed, in place of the fusion."""
    if index is None:
        return values.view(-1, batch, *values.shape[1:]).sum(0)
    return values.new_zeros((batch,) + values.shape[1:]).index_add(0, index % batch, values)


def make_step(setup: dict, variant: str, device: torch.device):
    """A closure running one full training step of ``variant`` on pre-built batches."""
    from pretrain.head import build_student_teacher, ema_update
    from pretrain.loss import DualCenteringDINOLoss
    from pretrain.train import build_optimizer, clip_gradients

    torch.manual_seed(0)
    out_dim, hidden, bottleneck = setup["head"]
    student, teacher = build_student_teacher(setup["model"], dict(out_dim=out_dim, hidden_dim=hidden,
                                                                  bottleneck_dim=bottleneck), setup["drop_path"])
    student, teacher = student.to(device), teacher.to(device).eval()
    if variant == "stems_only":
        for net in (student, teacher):
            fusion = net.backbone.patch_embed.fusion
            fusion.combine = types.MethodType(_sum_modalities, fusion)
    centering = "dual" if variant == "terrafm" else "dino"
    loss_fn = DualCenteringDINOLoss(out_dim, 2 + setup["n_local"], np.full(10, 0.04), alpha=setup["alpha"],
                                    centering=centering).to(device)
    optimizer = build_optimizer(student, lr=1e-4)  # the optimizer training uses
    batches = make_batches(setup, variant, device)
    amp = device.type == "cuda"
    count = [0]

    def step() -> None:
        teacher_groups, student_groups, frequent = batches[count[0] % len(batches)]
        count[0] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                t = teacher(teacher_groups)
            s = student(student_groups)
        loss = loss_fn(s.float(), t.float(), 0, frequent)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(student, 3.0)
        optimizer.step()
        ema_update(teacher, student, 0.996)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak_rss(config: str, variant: str, steps: int) -> None:
    """(child process) Print peak RSS over ``steps`` steps and its excess over the RSS before them."""
    step = make_step(get_setup(config), variant, torch.device("cpu"))
    step()  # optimizer state and lazily built buffers exist from here on
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _proc_status_mb("VmRSS")
    for _ in range(steps):
        step()
    peak = _proc_status_mb("VmHWM")
    print(json.dumps({"peak_rss_mb": round(peak, 1), "step_peak_mb": round(peak - before, 1)}))


def peak_rss_in_subprocess(config: str, variant: str, steps: int, threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--peak-child", config, variant,
                          str(steps), "--threads", str(threads)],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"peak-memory child {config}/{variant} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def count_flops(step, n_batches: int = N_BATCHES) -> float:
    """Mean matmul/convolution FLOPs of a step over the cycled batches (runs ``n_batches`` steps).

    ``plain_dino`` FLOPs / ``terrafm`` FLOPs is the ratio the two would reach if both ran at the
    same FLOP rate: the work modality augmentation adds (more stems per view, more rows through
    the projection) caps the ratio there, however cheap the rest of the step is made.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        for _ in range(n_batches):
            step()
    return counter.get_total_flops() / n_batches


def time_interleaved(steps: dict, rounds: int, steps_per_round: int) -> dict:
    """Per variant, lists of (wall s, CPU s) per step; variants alternate step by step."""
    times = {v: {"wall": [], "cpu": []} for v in steps}
    order = list(steps)
    for r in range(rounds):
        for _ in range(steps_per_round):
            for variant in (order if r % 2 == 0 else order[::-1]):
                wall, cpu = time.perf_counter(), time.process_time()
                steps[variant]()
                times[variant]["wall"].append(time.perf_counter() - wall)
                times[variant]["cpu"].append(time.process_time() - cpu)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(SETUP_NAMES), choices=SETUP_NAMES)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--peak-child", nargs=3, metavar=("CONFIG", "VARIANT", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_child:
        config, variant, n = args.peak_child
        measure_peak_rss(config, variant, int(n))
        return
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for config in args.configs:
            setup = get_setup(config)
            load_before = os.getloadavg()
            steps = {v: make_step(setup, v, device) for v in VARIANTS}
            flops = {v: count_flops(s) for v, s in steps.items()}  # also the warm-up
            times = time_interleaved(steps, args.rounds, args.steps)
            row = {"device": device.type, "config": config, "source": setup["source"], "batch": setup["batch"],
                   "modalities": "+".join(setup["modalities"]),
                   "crops": f"2x{setup['global_size']} + {setup['n_local']}x{setup['local_size']}",
                   "steps_per_variant": args.rounds * args.steps}
            for v in VARIANTS:
                row[f"{v}_gflop_per_step"] = round(flops[v] / 1e9, 3)
            row["flop_bound"] = round(flops["plain_dino"] / flops["terrafm"], 3)
            for clock in ("wall", "cpu"):
                rate = {v: setup["batch"] / statistics.median(t[clock]) for v, t in times.items()}
                for v in VARIANTS:
                    row[f"{v}_samples_s_{clock}"] = float(f"{rate[v]:.4g}")
                row[f"ratio_{clock}"] = round(rate["terrafm"] / rate["plain_dino"], 3)
                row[f"stems_only_vs_plain_{clock}"] = round(rate["stems_only"] / rate["plain_dino"], 3)
                row[f"terrafm_vs_stems_only_{clock}"] = round(rate["terrafm"] / rate["stems_only"], 3)
            row["loadavg_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
            if device.type == "cpu" and not args.no_memory:
                del steps
                for v in MEMORY_VARIANTS:
                    peak = peak_rss_in_subprocess(config, v, 2, args.threads)
                    row[f"{v}_peak_rss_mb"] = peak["peak_rss_mb"]
                    row[f"{v}_step_peak_mb"] = peak["step_peak_mb"]  # above models + optimizer state
                row["step_peak_ratio"] = round(row["terrafm_step_peak_mb"] / row["plain_dino_step_peak_mb"], 3)
            elif device.type == "cuda":
                for v, s in steps.items():
                    torch.cuda.reset_peak_memory_stats()
                    s()
                    row[f"{v}_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                row["note"] = "bf16 autocast"
            print(json.dumps(row), flush=True)
    print("flop_bound = plain_dino / terrafm matmul+conv FLOPs per step, the ratio at equal FLOP rates; "
          "ratio = terrafm samples/s / plain single-modality DINO samples/s (target >= 0.9); "
          "stems_only_vs_plain = the extra work of modality augmentation alone, terrafm_vs_stems_only = "
          "the fusion and dual centering; wall and process-CPU clocks, medians of interleaved steps")


if __name__ == "__main__":
    main()
