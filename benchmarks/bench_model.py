"""TerraFM-B forward throughput against timm's bare ViT-B/16 and a naive reference, one run.

Measures images/s at batch 8 and 224 px for: terrafm_base with one modality (S2 L2A), with all
three modalities fused, timm's ``vit_base_patch16_224`` (no stem), and a naive forward written
the way the release does it (explicit softmax(q k^T) attention). Variants are interleaved over
several rounds so background load hits them alike; each variant's peak RSS is measured in a
fresh subprocess. CPU fp32 always; CUDA bf16 too when a GPU is present.

Precision rows (terrafm_single, same batch): the default ``precision="auto"`` against
``precision="fp32"`` (the img/s ratio; goal >= 2.0 on a CPU with native bf16, where auto is bf16),
explicit bf16 by autocast (what ``auto`` runs there) against fp32 on this CPU whatever its flags,
and bf16 by weights cast once (model and inputs in bf16, no autocast), the alternative to
autocast; with the CPU's bf16 flags and what ``auto`` resolved to. ``--precision-only`` runs just
these (emulated bf16 on a CPU without it is slow: use a small ``--batch``).

    python benchmarks/bench_model.py [--batch 8] [--rounds 3] [--threads N] [--precision-only]
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


def time_variant(fn, make_inputs, batch: int, device, precision: str, iters: int) -> float:
    from terrafm.model import autocast

    inputs = make_inputs(batch)
    with torch.inference_mode(), autocast(device, precision):
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
    parser.add_argument("--precision-only", action="store_true", help="only the precision rows")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision_only:
        precision_rows(args)
        return
    targets = [("cpu", "fp32")]
    if torch.cuda.is_available():
        targets.append(("cuda", "bf16"))
    for device_name, precision in targets:
        device = torch.device(device_name)
        built = {v: build(v, device) for v in VARIANTS}
        rates = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for v in VARIANTS:
                rates[v].append(time_variant(*built[v], args.batch, device, precision, args.iters))
        med = {v: statistics.median(r) for v, r in rates.items()}
        mem = {v: peak_memory_mb(v, args.batch, device_name) for v in VARIANTS}
        label = f"{device_name} {precision}"
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
    precision_rows(args)


PRECISION_MODES = ("auto", "fp32", "bf16_autocast", "bf16_weights")


def cpu_bf16_flags() -> str:
    """The CPU's bf16-related flags as the OS lists them (x86 flags / aarch64 Features)."""
    from terrafm.model import cpu_features

    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return "no /proc/cpuinfo"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    names = cpu_features.X86_BF16_FLAGS + cpu_features.ARM_BF16_FLAGS + ("amx_tile", "avx512f", "avx2")
    listed = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            listed |= set(value.split())
    return f"{model}; " + ", ".join(f"{n}={'yes' if n in listed else 'no'}" for n in names)


def precision_rows(args) -> None:
    """terrafm_single at auto / fp32 / bf16 (autocast) / bf16 (weights cast once), CPU, interleaved."""
    import copy

    from terrafm.model import autocast_dtype, cpu_features

    device = torch.device("cpu")
    model, make_inputs = build("terrafm_single", device)
    cast = copy.deepcopy(model).to(torch.bfloat16)
    runs = {
        "auto": (model, make_inputs, "auto"),
        "fp32": (model, make_inputs, "fp32"),
        "bf16_autocast": (model, make_inputs, "bf16"),
        "bf16_weights": (cast, lambda b: ({k: v.to(torch.bfloat16) for k, v in make_inputs(b)[0].items()},), "fp32"),
    }
    rates = {m: [] for m in PRECISION_MODES}
    for _ in range(args.rounds):
        for mode in PRECISION_MODES:
            fn, mk, precision = runs[mode]
            rates[mode].append(time_variant(fn, mk, args.batch, device, precision, args.iters))
    med = {m: statistics.median(r) for m, r in rates.items()}
    answer = cpu_features.native_bf16()
    auto = "fp32" if autocast_dtype(device, "auto") is None else "bf16"
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"\n== precision on CPU, terrafm_base single modality, batch {args.batch}, 224 px, torch threads "
          f"{torch.get_num_threads()}, median of {args.rounds} interleaved rounds, load {load} ==")
    print(f"CPU: {cpu_bf16_flags()}")
    print(f"auto -> {auto} ({answer.source})")
    for mode in PRECISION_MODES:
        print(f"{mode:18s} {med[mode]:8.3f} img/s   rounds {' '.join(f'{r:.3f}' for r in rates[mode])}")
    print(f"{'default (auto) / fp32 (goal >= 2.0 on a native-bf16 CPU)':58s} {med['auto'] / med['fp32']:5.2f}")
    print(f"{'bf16 autocast / fp32 (this CPU)':58s} {med['bf16_autocast'] / med['fp32']:5.2f}")
    print(f"{'bf16 weights cast once / fp32 (this CPU)':58s} {med['bf16_weights'] / med['fp32']:5.2f}")
    print(f"{'bf16 weights cast once / bf16 autocast':58s} {med['bf16_weights'] / med['bf16_autocast']:5.2f}")
    weights = [p for p in model.parameters() if p.dim() > 1]
    start = time.perf_counter()
    for _ in range(3):
        with torch.inference_mode():
            [p.to(torch.bfloat16) for p in weights]
    per_forward = (time.perf_counter() - start) / 3
    print(f"{'autocast overhead: casting the matrices once (s/forward)':58s} {per_forward:5.3f} "
          f"(one batch takes {args.batch / med['bf16_autocast']:.2f} s here)")


if __name__ == "__main__":
    main()
