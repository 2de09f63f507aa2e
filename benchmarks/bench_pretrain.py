"""Training-step throughput of TerraFM pretraining against a plain single-modality DINO step.

Both variants use the same backbone, head, optimizer, multi-crop sizes and batch, measured side
by side in one run (interleaved rounds, so background load hits both alike):

- ``terrafm``: modality augmentation (per view and sample, independent for student and
  teacher, threshold 0.5, over S2 L2A + S2 L1C + S1, selection carried by the masks; fusion
  where several are chosen) and the dual-centering loss;
- ``plain_dino``: S2 L2A only through its stem, the usual single DINO center (alpha = 1).

A step = teacher forward on 2 globals, student forward on 2 globals + J locals, loss, backward,
per-parameter clip, AdamW step, EMA. Inputs are random normalized tensors (data loading is not
timed). Peak RSS of each variant is measured in a fresh subprocess. CPU fp32; CUDA bf16 too when
present.

    python benchmarks/bench_pretrain.py [--configs tiny base] [--steps 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

SETUPS = {  # model, batch, global, local, n_local, head (out, hidden, bottleneck)
    "tiny": dict(model="terrafm_tiny", batch=16, global_size=64, local_size=32, n_local=4,
                 head=(4096, 256, 64)),
    "base": dict(model="terrafm_base", batch=2, global_size=224, local_size=96, n_local=2,
                 head=(65536, 2048, 256)),
}
MODALITIES = ("s2_l2a", "s2_l1c", "s1")
CHANNELS = {"s2_l2a": 12, "s2_l1c": 12, "s1": 2}


def make_step(setup: dict, variant: str, device: torch.device):
    from pretrain.augment import select_modalities
    from pretrain.head import build_student_teacher, ema_update
    from pretrain.loss import DualCenteringDINOLoss
    from pretrain.train import clip_gradients, param_groups

    out_dim, hidden, bottleneck = setup["head"]
    student, teacher = build_student_teacher(setup["model"], dict(out_dim=out_dim, hidden_dim=hidden,
                                                                  bottleneck_dim=bottleneck))
    student, teacher = student.to(device), teacher.to(device).eval()
    n_crops = 2 + setup["n_local"]
    alpha = 0.8 if variant == "terrafm" else 1.0
    loss_fn = DualCenteringDINOLoss(out_dim, n_crops, np.full(10, 0.04), alpha=alpha).to(device)
    optimizer = torch.optim.AdamW(param_groups(student), lr=1e-4)
    batch = setup["batch"]
    rng = np.random.default_rng(0)
    amp = device.type == "cuda"

    def group(n_views: int, size: int):
        n = n_views * batch
        if variant == "plain_dino":
            return {"s2_l2a": torch.rand(n, 12, size, size, device=device)}, {}
        chosen = [select_modalities(MODALITIES, rng) for _ in range(n)]
        inputs, masks = {}, {}
        for key in MODALITIES:
            keep = torch.tensor([key in c for c in chosen], device=device)
            if keep.any():
                inputs[key] = torch.rand(n, CHANNELS[key], size, size, device=device)
                masks[key] = keep[:, None, None].expand(n, size // 16, size // 16).contiguous()
        return inputs, masks

    frequent = torch.tensor([i % 2 == 0 for i in range(batch)], device=device)

    def step() -> None:
        teacher_groups = [group(2, setup["global_size"])]
        student_groups = [group(2, setup["global_size"]), group(setup["n_local"], setup["local_size"])]
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


def peak_rss_mb(config: str, variant: str, steps: int, threads: int) -> tuple[float, float]:
    """Peak RSS of a fresh process running ``steps`` steps, and its growth after the models were built."""
    code = (f"import torch, resource, sys; sys.path.insert(0, '.'); torch.set_num_threads({threads});"
            "from benchmarks.bench_pretrain import make_step, SETUPS;"
            f"s = make_step(SETUPS['{config}'], '{variant}', torch.device('cpu'));"
            "built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024;"
            f"[s() for _ in range({steps})];"
            "print(built, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    built, peak = map(float, out.stdout.strip().splitlines()[-1].split())
    return peak, peak - built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "base"], choices=list(SETUPS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        for config in args.configs:
            setup = SETUPS[config]
            steps = {v: make_step(setup, v, device) for v in ("terrafm", "plain_dino")}
            for s in steps.values():
                s()  # warm-up
            times = {v: [] for v in steps}
            for _ in range(args.rounds):
                for variant, s in steps.items():
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        s()
                    times[variant].append((time.perf_counter() - start) / args.steps)
            rate = {v: setup["batch"] / statistics.median(t) for v, t in times.items()}
            row = {"device": device.type, "config": config, "batch": setup["batch"],
                   "crops": f"2x{setup['global_size']} + {setup['n_local']}x{setup['local_size']}",
                   "terrafm_samples_s": round(rate["terrafm"], 2),
                   "plain_dino_samples_s": round(rate["plain_dino"], 2),
                   "ratio": round(rate["terrafm"] / rate["plain_dino"], 3)}
            if device.type == "cpu":
                for v in steps:
                    peak, step = peak_rss_mb(config, v, 2, args.threads)
                    row[f"{v}_peak_rss_mb"] = round(peak, 1)
                    row[f"{v}_step_rss_mb"] = round(step, 1)  # growth above the built models
                row["rss_ratio"] = round(row["terrafm_peak_rss_mb"] / row["plain_dino_peak_rss_mb"], 3)
            else:
                row["note"] = "bf16 autocast"
            results.append(row)
            print(json.dumps(row), flush=True)
    print("ratio = terrafm samples/s / plain single-modality DINO samples/s (target >= 0.9)")


if __name__ == "__main__":
    main()
