"""Every notebook runs end to end (nbclient) in local mode: local STAC API, real Sentinel COGs,
untrained terrafm_tiny. A check cell appended to each notebook reports what its maps hold."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"

COMMON = """
import json as _json
def _report(**values):
    print("CHECK " + _json.dumps(values, default=float))
"""

CHECKS = {
    "01_quickstart.ipynb": """
layer = viz.get_layer(m, "TerraFM embedding (PCA)")
(south, west), (north, east) = layer.overlay.bounds
_report(mode=cfg.mode, dims=list(emb.dims), depth=emb.sizes["embedding"], valid=float(emb.valid.mean()),
        opaque=float((layer.overlay.rgba[..., 3] > 0).mean()), bounds=[west, south, east, north],
        bbox=list(cfg.bbox), crs=str(emb.rio.crs), in_map=layer.image in m.layers)
""",
    "02_umap_explorer.ipynb": """
_report(error=link.error, n_points=len(link.coords), n_valid=int(emb.valid.sum()),
        scatter_points=len(link.scatter.x), has_umap_layer=viz.get_layer(link.map, "UMAP colours") is not None)
""",
    "03_change_detection.ipynb": """
import numpy as _np
_report(error=app.error, times=[str(t) for t in emb.time.values], threshold=app.threshold,
        otsu=result.attrs["threshold"], changed_layer=viz.get_layer(app.map, "changed") is not None,
        hist_total=int(app.histogram[0].sum()), n_both=int(_np.isfinite(result.distance.values).sum()))
""",
    "04_similarity_search.ipynb": """
import numpy as _np
r, c = app.query_cell
_report(error=app.error, n_matches=len(app.matches), query_similarity=float(app.similarity.values[r, c]),
        best=float(app.matches["similarity"].iloc[0]), markers=len(app.markers.layers))
""",
    "05_fewshot_landcover.ipynb": """
import numpy as _np
_valid = _np.asarray(emb.valid.values)
_report(names=names, n_train=clf.report["n_train"], accuracy=clf.report.get("accuracy"),
        predicted_valid=bool(_np.isfinite(prediction["class"].values[_valid]).all()),
        tool_error=tool.error, has_layer=viz.get_layer(m, "predicted land cover") is not None)
""",
    "06_pretraining.ipynb": """
import numpy as _np
import torch
from terrafm.model import create_model as _create, load_weights as _load
from pretrain.head import build_student_teacher as _pair
_fresh = _create(train_cfg.model.name).eval()
_result = _load(_fresh, weights)
_state = torch.load(setup.output_dir / "checkpoint.pth", map_location="cpu", weights_only=False)
_m = train_cfg.model
_, _teacher = _pair(_m.name, dict(out_dim=_m.out_dim, hidden_dim=_m.hidden_dim, bottleneck_dim=_m.bottleneck_dim))
_teacher.load_state_dict(_state["teacher"])
_teacher.eval()
_gen = torch.Generator().manual_seed(0)
_x = {"s2_l2a": torch.rand(2, 12, 48, 48, generator=_gen), "s1": torch.rand(2, 2, 48, 48, generator=_gen)}
with torch.no_grad():
    _ours, _ref = model(_x), _teacher.backbone(_x)
def _initial_backbone(seed):  # what train() builds before step 1 (same seed, same calls)
    torch.manual_seed(seed)
    _, _t = _pair(_m.name, dict(out_dim=_m.out_dim, hidden_dim=_m.hidden_dim, bottleneck_dim=_m.bottleneck_dim,
                               n_layers=_m.head_layers, norm_last_layer=_m.norm_last_layer), _m.drop_path_rate)
    return _t.backbone.state_dict()
_init, _other = _initial_backbone(train_cfg.run.seed), _initial_backbone(train_cfg.run.seed + 1)
_exported = torch.load(weights, map_location="cpu")
_moved = max(float((_exported[k] - _init[k]).abs().max()) for k in _init)
_seed_gap = max(float((_other[k] - _init[k]).abs().max()) for k in _init)
_valid = _np.asarray(emb.valid.values)
_layer = viz.get_layer(m, "pretrained embedding (PCA)")
_report(mode=setup.mode, losses=[float(v) for v in losses], csv_loss=curves["loss"].tolist(),
        total_iters=train_cfg.total_iters, iteration=_state["iteration"],
        fusion_trained=bool(_result.fusion_trained), missing=list(_result.missing_fusion),
        cls_diff=float((_ours.cls - _ref.cls).abs().max()), patch_diff=float((_ours.patch - _ref.patch).abs().max()),
        moved=_moved, seed_gap=_seed_gap, modalities=list(emb.attrs["modalities"]),
        sha=model.checkpoint_sha256, emb_sha=emb.attrs.get("checkpoint_sha256"),
        file_sha=__import__("hashlib").sha256(open(weights, "rb").read()).hexdigest(),
        valid=float(_valid.mean()), finite_where_valid=bool(_np.isfinite(emb.values[_valid]).all()),
        depth=emb.sizes["embedding"], opaque=float((_layer.overlay.rgba[..., 3] > 0).mean()),
        in_map=_layer.image in m.layers)
""",
}


@pytest.fixture(scope="module")
def local_mode(stac_api_url, monkeypatch_module):
    monkeypatch_module.setenv("TERRAFM_NOTEBOOK_MODE", "local")
    monkeypatch_module.setenv("TERRAFM_STAC_URL", stac_api_url)
    # kernels with one torch/OpenMP thread: tiny models gain little from two, and on a busy
    # 2-core runner spinning OpenMP threads slow them down several times
    monkeypatch_module.setenv("OMP_NUM_THREADS", "1")
    return stac_api_url


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def run_notebook(name: str) -> dict:
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(COMMON + CHECKS[name]))
    NotebookClient(nb, timeout=240, kernel_name="python3", shutdown_kernel="immediate",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    for output in nb.cells[-1].outputs:
        if output.get("name") == "stdout" and "CHECK " in output.get("text", ""):
            return json.loads(output["text"].split("CHECK ", 1)[1])
    raise AssertionError(f"{name}: the check cell printed nothing")


def test_every_notebook_has_a_check():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(CHECKS)


def test_quickstart(local_mode):
    r = run_notebook("01_quickstart.ipynb")
    assert r["mode"] == "local" and r["in_map"]
    assert r["dims"] == ["time", "y", "x", "embedding"] and r["depth"] == 64
    assert r["opaque"] > 0.5 and r["valid"] > 0.5
    # the overlay sits on the requested area: bounds within ~2 cells (160 m ~ 0.002 deg) of the bbox
    for got, want in zip(r["bounds"], r["bbox"]):
        assert abs(got - want) < 0.004, (r["bounds"], r["bbox"])


def test_umap_explorer(local_mode):
    r = run_notebook("02_umap_explorer.ipynb")
    assert r["error"] is None and r["has_umap_layer"]
    assert r["n_points"] == r["n_valid"] == r["scatter_points"] > 50


def test_change_detection(local_mode):
    r = run_notebook("03_change_detection.ipynb")
    assert r["error"] is None and r["changed_layer"]
    assert len(r["times"]) == 2 and r["times"][0][:7] == "2021-06" and r["times"][1][:7] == "2021-07"
    assert r["threshold"] == pytest.approx(r["otsu"])
    assert r["hist_total"] == r["n_both"] > 0


def test_similarity_search(local_mode):
    r = run_notebook("04_similarity_search.ipynb")
    assert r["error"] is None and r["n_matches"] == 15 and r["markers"] == 16
    assert r["query_similarity"] == pytest.approx(1.0, abs=1e-5) and r["best"] == pytest.approx(1.0, abs=1e-5)


def test_fewshot_landcover(local_mode):
    r = run_notebook("05_fewshot_landcover.ipynb")
    assert r["tool_error"] is None and r["has_layer"] and r["predicted_valid"]
    assert len(r["names"]) >= 2 and all(not n.isdigit() for n in r["names"])
    assert r["n_train"] > 50 and r["accuracy"] is not None


def test_default_mode_is_planetary_computer_with_released_weights(monkeypatch):
    from terrafm.viz.notebook import notebook_mode, open_notebook_area

    monkeypatch.delenv("TERRAFM_NOTEBOOK_MODE", raising=False)
    cfg = open_notebook_area("quickstart")
    assert notebook_mode() == "planetary-computer" and not cfg.local
    assert cfg.stac["catalog"] == "planetary-computer" and cfg.embed["weights"] == "hf"
    assert cfg.embed["model"] == "terrafm_base" and cfg.toolbar
    monkeypatch.setenv("TERRAFM_NOTEBOOK_MODE", "offline")
    with pytest.raises(ValueError, match="use 'local'"):
        notebook_mode()


def test_pretraining(local_mode, monkeypatch, tmp_path):
    import math

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's Major-TOM set and run land in pytest's tmp
    r = run_notebook("06_pretraining.ipynb")
    assert len(list(tmp_path.glob("terrafm_majortom_*/run/checkpoint.pth"))) == 1
    assert r["mode"] == "local"
    # the whole short run (5 epochs of tiny_cpu, 15 steps today), all finite; metrics.csv holds
    # the same numbers the loop returned
    assert r["total_iters"] == r["iteration"] == len(r["losses"]) and 5 <= len(r["losses"]) <= 30
    assert all(math.isfinite(v) and 0 < v < 2 * math.log(256) for v in r["losses"])
    assert r["csv_loss"] == pytest.approx(r["losses"], rel=1e-6)
    # the export loads strictly (trained fusion included) and is the teacher, bit for bit
    assert r["fusion_trained"] and r["missing"] == []
    assert r["cls_diff"] == 0.0 and r["patch_diff"] == 0.0
    # the exported teacher is the run's initial teacher moved by 15 EMA steps: changed, but far
    # closer to it than another seed's initialisation is
    assert 0 < r["moved"] < 0.1 * r["seed_gap"], (r["moved"], r["seed_gap"])
    assert sorted(r["modalities"]) == ["s1", "s2_l2a"]  # the two stems it was trained on
    # the embeddings carry the exported checkpoint's provenance and are on the map
    assert r["emb_sha"] == r["sha"] == r["file_sha"]
    assert r["depth"] == 64 and r["valid"] > 0.5 and r["finite_where_valid"]
    assert r["in_map"] and r["opaque"] > 0.5


def test_pretraining_default_mode_names_the_download(monkeypatch, tmp_path):
    from terrafm.viz.notebook import open_pretraining_data

    monkeypatch.delenv("TERRAFM_NOTEBOOK_MODE", raising=False)
    monkeypatch.setenv("TERRAFM_MAJORTOM_ROOT", str(tmp_path / "majortom"))
    with pytest.raises(FileNotFoundError, match="huggingface-cli download Major-TOM/Core-S2L2A"):
        open_pretraining_data()
    shard = tmp_path / "majortom" / "Core-S2L2A" / "images"
    shard.mkdir(parents=True)
    (shard / "part_00001.parquet").write_bytes(b"")
    setup = open_pretraining_data(tmp_path / "run")
    assert setup.config == "tiny_cpu" and setup.root == tmp_path / "majortom"
    assert f"data.root={tmp_path / 'majortom'}" in setup.overrides and "data.modalities=[s2_l2a]" in setup.overrides
    from pretrain.config import load_config

    cfg = load_config(setup.config, setup.overrides)
    assert cfg.total_iters == 10 * (128 // cfg.optim.batch_size)
    assert cfg.data.modalities == ["s2_l2a"] and cfg.model.name == "terrafm_tiny"
