"""TerraFM-B forward throughput against timm's bare ViT-B/16 and a naive reference, one run.

Measures images/s at batch 8 and 224 px for: terrafm_base with one modality (S2 L2A), with all
three modalities fused, timm's ``vit_base_patch16_224`` (no stem), and a naive forward written
the way the release does it (explicit softmax(q k^T) attention). Variants are interleaved over
several rounds so background load hits them alike; each variant's peak RSS is measured in a
fresh subprocess. CPU fp32 always; CUDA bf16 too when a GPU is present.

    python benchmarks/bench_model.py [--batch 8] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("terrafm_single", "terrafm_fused", "timm_vit_b16", "naive_reference")


def build(variant: str, device: torch.device):
    import timm

    from terrafm.model import create_model

    if variant == "timm_vit_b16":
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        return model.to(device).eval(), lambda b: (torch.randn(b, 3, 224, 224, device=device),)
    model = create_model("terrafm_base").to(device).eval().fold_for_inference()   # the path embed() runs
    if variant == "terrafm_single":
        return model, lambda b: ({"s2_l2a": torch.randn(b, 12, 224, 224, device=device)},)
    if variant == "terrafm_fused":
        return model, lambda b: ({"s2_l2a": torch.randn(b, 12, 224, 224, device=device),
                                  "s2_l1c": torch.randn(b, 12, 224, 224, device=device),
                                  "s1": torch.randn(b, 2, 224, 224, device=device)},)
    return (lambda x: naive_forward(model, x)), lambda b: (torch.randn(b, 12, 224, 224, device=device),)


def naive_forward(model, image: torch.Tensor) -> torch.Tensor:
    """The released single-modality forward with attention written out (no fused kernels)."""
    pe = model.patch_embed
    t = pe.conv2d_s2_l2a(image).flatten(2).transpose(1, 2) + pe.s2_l2a_embed
    proj = pe.projection
    t = proj.proj3(proj.proj2(proj.norm_input(proj.proj1(t))))
    x = torch.cat([model.cls_token.expand(len(t), -1, -1), t], 1) + model.pos_embed
    for blk in model.blocks:
        y = blk.norm1(x)
        b, n, c = y.shape
        h = blk.attn.num_heads
        qkv = blk.attn.qkv(y).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (c // h) ** -0.5
        y = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + blk.attn.proj(y)
        x = x + blk.mlp(blk.norm2(x))
    return model.norm(x)[:, 0]


def time_variant(fn, make_inputs, batch: int, device, dtype, iters: int) -> float:
    inputs = make_inputs(batch)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), ctx:
        fn(*inputs)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            fn(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - start)


def vm_hwm_mb() -> float:
    """Peak resident memory of this process (VmHWM; unlike ru_maxrss it is not inherited
    across fork + exec from a large parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_mb(variant: str, batch: int, device: str) -> float:
    code = (
        "import torch, sys; sys.path.insert(0, 'benchmarks'); import bench_model as b; "
        f"dev = torch.device('{device}'); fn, mk = b.build('{variant}', dev); "
        f"x = mk({batch});\n"
        "with torch.inference_mode(): fn(*x)\n"
        "peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == 'cuda' else "
        "b.vm_hwm_mb())\n"
        "print(peak)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = [("cpu", None)]
    if torch.cuda.is_available():
        targets.append(("cuda", torch.bfloat16))
    for device_name, dtype in targets:
        device = torch.device(device_name)
        built = {v: build(v, device) for v in VARIANTS}
        rates = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for v in VARIANTS:
                rates[v].append(time_variant(*built[v], args.batch, device, dtype, args.iters))
        med = {v: statistics.median(r) for v, r in rates.items()}
        mem = {v: peak_memory_mb(v, args.batch, device_name) for v in VARIANTS}
        label = f"{device_name} {'fp32' if dtype is None else str(dtype).split('.')[-1]}"
        print(f"\n== {label}, batch {args.batch}, 224 px, torch threads {torch.get_num_threads()}, "
              f"median of {args.rounds} interleaved rounds ==")
        for v in VARIANTS:
            print(f"{v:18s} {med[v]:8.2f} img/s   peak {'GPU memory' if device.type == 'cuda' else 'RSS'}"
                  f" {mem[v]:7.0f} MB (model + one batch, fresh process)")
        ratios = {
            "terrafm single / timm bare ViT-B (target >= 0.78)": med["terrafm_single"] / med["timm_vit_b16"],
            "fused (3 modalities) / single (target >= 0.45)": med["terrafm_fused"] / med["terrafm_single"],
            "terrafm single / naive reference (target >= 1.2)": med["terrafm_single"] / med["naive_reference"],
        }
        for name, value in ratios.items():
            print(f"{name:52s} {value:5.2f}")
        print(f"{'bound: bare timm / naive (same trunk, zero-cost stem)':52s} "
              f"{med['timm_vit_b16'] / med['naive_reference']:5.2f}")


if __name__ == "__main__":
    main()
