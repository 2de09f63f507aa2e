"""Every notebook runs end to end (nbclient) through the offline launcher (notebooks/offline.py):
local STAC API, real Sentinel COGs, untrained terrafm_tiny. A check cell appended to each notebook
reports what its maps hold. Also: the notebooks show the real calls behind one settings cell, the
launcher rewrites only that cell, sets the proxy/SAS environment for the kernel alone and stops what
it started when set-up fails part-way."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import nbformat
import numpy as np
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
import os as _os
_report(catalog_url=CATALOG_URL, model=MODEL, dims=list(emb.dims), depth=emb.sizes["embedding"],
        valid=float(emb.valid.mean()), opaque=float((layer.overlay.rgba[..., 3] > 0).mean()),
        bounds=[west, south, east, north], bbox=list(BBOX), crs=str(emb.rio.crs), in_map=layer.image in m.layers,
        http_proxy=_os.environ.get("http_proxy"), sas_url=_os.environ.get("PC_SDK_SAS_URL"))
""",
    "02_umap_explorer.ipynb": """
_report(error=link.error, n_points=len(link.coords), n_valid=int(emb.valid.sum()),
        scatter_points=len(link.scatter.x), has_umap_layer=viz.get_layer(link.map, "UMAP colours") is not None)
""",
    "03_change_detection.ipynb": """
import numpy as _np
_report(error=app.error, times=[str(t) for t in emb.time.values], threshold=app.threshold, both=both,
        otsu=result.attrs["threshold"], changed_layer=viz.get_layer(app.map, "changed") is not None,
        hist_total=int(app.histogram[0].sum()), n_both=int(_np.isfinite(result.distance.values).sum()),
        series_times=[str(t) for t in series.time.values], series_error=series_app.error,
        slider_dates=len(series_app.time_slider.options), series_dims=list(series.dims),
        series_first=_np.asarray(series_app.series.first_change_index.values).tolist(),
        notebook_first=_np.asarray(first.first_change_index.values).tolist(),
        n_changed=int((first.first_change_index >= 0).sum()), store=str(SERIES_STORE),
        series_x=series.x.values.tolist(), series_y=series.y.values.tolist(), series_crs=series.rio.crs.to_epsg())
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
_state = torch.load(RUN_DIR / "checkpoint.pth", map_location="cpu", weights_only=True)
_m = train_cfg.model
_, _teacher = _pair(_m.name, dict(out_dim=_m.out_dim, hidden_dim=_m.hidden_dim, bottleneck_dim=_m.bottleneck_dim))
_teacher.load_state_dict(_state["teacher"])
_teacher.eval()
_gen = torch.Generator().manual_seed(0)
_x = {"s2_l2a": torch.rand(2, 12, 48, 48, generator=_gen), "s1": torch.rand(2, 2, 48, 48, generator=_gen)}
with torch.no_grad():  # the export loaded into a fresh model, and the notebook's model (folded by embed)
    _ours, _ref, _nb = _fresh(_x), _teacher.backbone(_x), model(_x)
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
_report(run_dir=str(RUN_DIR), losses=[float(v) for v in losses], csv_loss=curves["loss"].tolist(),
        total_iters=train_cfg.total_iters, iteration=_state["iteration"],
        fusion_trained=bool(_result.fusion_trained), missing=list(_result.missing_fusion),
        cls_diff=float((_ours.cls - _ref.cls).abs().max()), patch_diff=float((_ours.patch - _ref.patch).abs().max()),
        notebook_model_diff=float((_nb.patch - _ref.patch).abs().max() / _ref.patch.abs().max()),
        moved=_moved, seed_gap=_seed_gap, modalities=list(emb.attrs["modalities"]),
        sha=model.checkpoint_sha256, emb_sha=emb.attrs.get("checkpoint_sha256"),
        file_sha=__import__("hashlib").sha256(open(weights, "rb").read()).hexdigest(),
        valid=float(_valid.mean()), finite_where_valid=bool(_np.isfinite(emb.values[_valid]).all()),
        depth=emb.sizes["embedding"], opaque=float((_layer.overlay.rgba[..., 3] > 0).mean()),
        in_map=_layer.image in m.layers)
""",
}



def run_notebook(name: str, stack) -> dict:
    """Execute the offline copy of ``name`` plus its check cell in a fresh kernel; the CHECK values."""
    from offline import execute, offline_notebook

    nb = offline_notebook(NOTEBOOKS / name, stack)
    nb.cells.append(nbformat.v4.new_code_cell(COMMON + CHECKS[name]))
    # kernels with one torch/OpenMP thread: tiny models gain little from two, and on a busy
    # 2-core runner spinning OpenMP threads slow them down several times
    execute(nb, stack, OMP_NUM_THREADS="1")
    for output in nb.cells[-1].outputs:
        if output.get("name") == "stdout" and "CHECK " in output.get("text", ""):
            return json.loads(output["text"].split("CHECK ", 1)[1])
    raise AssertionError(f"{name}: the check cell printed nothing")


def settings_namespace(source: str) -> dict:
    """The variables a settings cell defines (it is plain assignments: safe to run here)."""
    namespace: dict = {}
    exec(compile(source, "<settings>", "exec"), namespace)
    return {k: v for k, v in namespace.items() if k.isupper()}


# ------------------------------------------------------------------ the notebooks as files
def test_every_notebook_has_a_check():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(CHECKS)


def test_notebooks_are_what_make_notebooks_writes(tmp_path):
    import make_notebooks

    for path in make_notebooks.build(tmp_path):
        assert nbformat.read(path, 4) == nbformat.read(NOTEBOOKS / path.name, 4), \
            f"{path.name} differs from make_notebooks.py: run `python notebooks/make_notebooks.py`"


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_settings_cell_is_the_one_switch_and_defaults_to_planetary_computer(name):
    from offline import settings_cell

    nb = nbformat.read(NOTEBOOKS / name, 4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    settings = settings_cell(nb)
    assert settings is code[0], "the settings cell must be the first code cell"
    values = settings_namespace(settings.source)
    assert values["CATALOG_URL"] is None and values["TOOLBAR"] is True  # Planetary Computer, full map
    west, south, east, north = values["BBOX"]
    assert west < east and south < north and 11.5 < west < 11.6 and 48.0 < south < 48.2  # Munich, lon/lat
    if name != "06_pretraining.ipynb":
        assert values["MODEL"] == "terrafm_base" and values["WEIGHTS"] == "hf"
    # the analyst's calls are in the cells, with the settings' names, and nothing hides them
    rest = "\n".join(c.source for c in code[1:])
    for forbidden in ("os.environ", "TERRAFM_NOTEBOOK_MODE", "viz.notebook", "open_sentinel(", "**cfg", "sys.path"):
        assert forbidden not in rest, (name, forbidden)
    assert "terrafm.stac.search(BBOX, " in rest and "url=CATALOG_URL" in rest and "terrafm.stac.load(items, BBOX)" in rest
    assert "terrafm.embed(ds, model=" in rest and "toolbar=TOOLBAR" in rest
    # every setting is used by a later cell (a setting nobody reads would be a false switch)
    unused = [k for k in values if k not in rest]
    assert not unused, (name, unused)


# ------------------------------------------------------------------ the launcher, without servers
class _FakeStack:
    def __init__(self, values):
        self.values = values
        self.asked = None

    def settings(self, names):
        self.asked = sorted(names)
        return {k: v for k, v in self.values.items() if k in names}


def test_rewrite_settings_replaces_only_the_named_assignments():
    from offline import HEADER, rewrite_settings

    source = ('# keep me\n'
              'CATALOG_URL = None  # PC\n'
              'BBOX = (1.0, 2.0,\n'
              '        3.0, 4.0)  # two lines\n'
              'DATES = "2023-06-01/2023-06-30"\n')
    out = rewrite_settings(source, {"CATALOG_URL": ("http://127.0.0.1:1234", "local"),
                                    "BBOX": ((5.5, 6.5, 7.5, 8.5), "scene"), "UNUSED": (1, "not in the cell")})
    assert out.startswith(HEADER) and "# keep me\n" in out
    assert settings_namespace(out) == {"CATALOG_URL": "http://127.0.0.1:1234", "BBOX": (5.5, 6.5, 7.5, 8.5),
                                       "DATES": "2023-06-01/2023-06-30"}
    assert "CATALOG_URL = 'http://127.0.0.1:1234'  # offline: local" in out and "# PC" not in out
    with pytest.raises(ValueError, match="CATALOG_URL"):
        rewrite_settings('MODEL = "x"\n', {"MODEL": ("terrafm_tiny", "tiny")})


def test_offline_notebook_rewrites_the_settings_cell_and_nothing_else(tmp_path):
    from offline import offline_notebook

    stack = _FakeStack({"CATALOG_URL": ("http://127.0.0.1:9", "local"), "MODEL": ("terrafm_tiny", "tiny"),
                        "WEIGHTS": ("random", "untrained"), "RUN_DIR": (tmp_path / "run", "tmp")})
    for name in ("01_quickstart.ipynb", "06_pretraining.ipynb"):
        original = nbformat.read(NOTEBOOKS / name, 4)
        changed = offline_notebook(NOTEBOOKS / name, stack)
        differs = [i for i, (a, b) in enumerate(zip(original.cells, changed.cells)) if a.source != b.source]
        assert len(changed.cells) == len(original.cells) and differs == [1], (name, differs)
        values = settings_namespace(changed.cells[1].source)
        assert values["CATALOG_URL"] == "http://127.0.0.1:9"
        before = settings_namespace(original.cells[1].source)
        assert stack.asked == sorted(before)  # it asked for exactly the cell's names
        assert {k: v for k, v in values.items() if k not in stack.values} == \
               {k: v for k, v in before.items() if k not in stack.values}
        if name == "06_pretraining.ipynb":
            assert values["RUN_DIR"] == tmp_path / "run" and "MODEL" not in values
        else:
            assert values["MODEL"] == "terrafm_tiny" and values["WEIGHTS"] == "random"
        assert nbformat.read(NOTEBOOKS / name, 4) == original  # the file is not touched


def test_pretraining_default_settings_name_the_download(tmp_path, monkeypatch):
    """06's own cells, as a reader runs them by default: no Major-TOM data -> a message saying where
    to get it; with a shard present, the tiny_cpu run the markdown promises (160 iterations on S2 L2A)."""
    from offline import settings_cell

    nb = nbformat.read(NOTEBOOKS / "06_pretraining.ipynb", 4)
    setup = [c for c in nb.cells if c.cell_type == "code"][1].source
    namespace: dict = {}
    exec(settings_cell(nb).source, namespace)
    namespace["MAJORTOM_ROOT"] = tmp_path / "majortom"
    with pytest.raises(FileNotFoundError, match="download a shard"):
        exec(setup, dict(namespace))
    shard = tmp_path / "majortom" / "Core-S2L2A" / "images"
    shard.mkdir(parents=True)
    (shard / "part_00001.parquet").write_bytes(b"")
    exec(setup, namespace)
    cfg = namespace["train_cfg"]
    assert cfg.total_iters == 160 and cfg.optim.batch_size == 8 and cfg.optim.epochs == 10
    assert cfg.data.modalities == ["s2_l2a"] and cfg.model.name == "terrafm_tiny"
    assert str(cfg.data.root) == str(tmp_path / "majortom") and str(cfg.run.output_dir) == "runs/notebook06"
    assert cfg.data.cell_stats is None


# ------------------------------------------------------------------ the launcher's servers
def _port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


def test_launcher_stops_what_it_started_when_set_up_fails(tmp_path, monkeypatch):
    """The STAC API cannot start (no PostgreSQL binaries): the blob server already running is
    stopped, the work directory removed, the error reaches the caller, os.environ is untouched."""
    import offline

    support = offline._support()
    started = []
    original_start = support.storage_server.StorageServer.start

    def recording_start(self):
        started.append(self)
        return original_start(self)

    monkeypatch.setattr(support.storage_server.StorageServer, "start", recording_start)
    monkeypatch.setattr(support.pgstac_server, "PG_BIN", tmp_path / "no-postgres")
    environ = dict(os.environ)
    stack = offline.OfflineStack()
    workdir = stack.workdir
    with pytest.raises(RuntimeError, match="PostgreSQL binaries not found"):
        stack.start()
    assert len(started) == 1 and started[0]._proc.poll() is not None  # the blob server exited
    assert not _port_open(started[0].url)
    assert stack.storage is None and stack.catalog is None and not workdir.exists()
    assert dict(os.environ) == environ
    with pytest.raises(RuntimeError, match="not running"):
        stack.environment()


def test_launcher_environment_is_for_the_child_only(offline_stack):
    environ = dict(os.environ)
    env = offline_stack.environment({"HOME": "/home/x", "http_proxy": "http://corporate:3128", "NO_PROXY": "*"},
                                    OMP_NUM_THREADS="1")
    assert env == {"HOME": "/home/x", "OMP_NUM_THREADS": "1", "http_proxy": offline_stack.storage.url,
                   "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
                   "PC_SDK_SAS_URL": offline_stack.storage.sas_url}
    assert dict(os.environ) == environ  # building it changed nothing here
    assert offline_stack.catalog_url.startswith("http://127.0.0.1:") and _port_open(offline_stack.catalog_url)


def test_launcher_command_serves_voila_and_stops_everything_on_sigterm(tmp_path):
    """`python notebooks/offline.py voila NOTEBOOK`: the notebook is served, and `kill PID` stops
    Voila, the STAC API and the blob server and removes the work directory."""
    import re
    import signal
    import subprocess
    import sys
    import time

    home = tmp_path / "home"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "offline.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(NOTEBOOKS / "offline.py"), "voila", "04_similarity_search.ipynb",
                                 f"--port={port}"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not _port_open(f"http://127.0.0.1:{port}"):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        found = re.search(r"local STAC API (\S+), blob server (\S+), work directory (\S+)", log.read_text())
        api, blob, workdir = found.groups()
        assert _port_open(api) and _port_open(blob)
        copy = Path(workdir) / "notebooks" / "04_similarity_search.ipynb"
        assert f"CATALOG_URL = {api!r}" in nbformat.read(copy, 4).cells[1].source
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not _port_open(f"http://127.0.0.1:{port}") and not _port_open(api) and not _port_open(blob)
    assert not Path(workdir).exists()


# ------------------------------------------------------------------ the notebooks, executed
def test_quickstart(offline_stack):
    served_before = len(offline_stack.storage.requests)
    r = run_notebook("01_quickstart.ipynb", offline_stack)
    assert r["catalog_url"] == offline_stack.catalog_url and r["model"] == "terrafm_tiny" and r["in_map"]
    assert r["dims"] == ["time", "y", "x", "embedding"] and r["depth"] == 64
    assert r["opaque"] > 0.5 and r["valid"] > 0.5
    # the overlay sits on the requested area: bounds within ~2 cells (160 m ~ 0.002 deg) of the bbox
    for got, want in zip(r["bounds"], r["bbox"]):
        assert abs(got - want) < 0.004, (r["bounds"], r["bbox"])
    # the kernel (only it) got the routing, and the pixels came through it: signed reads of the
    # Planetary-Computer blob hosts answered by the local server
    assert r["http_proxy"] == offline_stack.storage.url and r["sas_url"] == offline_stack.storage.sas_url
    blob_reads = [q for q in offline_stack.storage.requests[served_before:]
                  if q[0].endswith(".blob.core.windows.net") and q[3] in (200, 206)]
    assert len(blob_reads) > 10 and any("sentinel2l2a01" in q[0] for q in blob_reads)


def test_umap_explorer(offline_stack):
    r = run_notebook("02_umap_explorer.ipynb", offline_stack)
    assert r["error"] is None and r["has_umap_layer"]
    assert r["n_points"] == r["n_valid"] == r["scatter_points"] > 50


def test_change_detection(offline_stack):
    r = run_notebook("03_change_detection.ipynb", offline_stack)
    assert r["error"] is None and r["changed_layer"]
    assert len(r["times"]) == 2 and r["times"][0][:10] == "2021-06-05" and r["times"][1][:10] == "2021-07-15"
    # the second season has no Sentinel-1 pass within its window: only S2 is compared
    assert r["both"] == ["s2_l2a"]
    assert r["threshold"] == pytest.approx(r["otsu"])
    assert r["hist_total"] == r["n_both"] > 0
    # the series: every test date at least half clear, one store, the app's change map equal to the notebook's
    assert r["series_error"] is None and r["series_dims"] == ["time", "y", "x", "embedding"]
    assert len(r["series_times"]) == r["slider_dates"] >= 3
    assert r["series_first"] == r["notebook_first"]
    # every test date is the same real L1C scene (per-date gain, clouds) except the scene's one known change
    # (tests/support/scene.py: from the change date on, an 840 m block of marsh holds a field's real pixels):
    # every cell wholly inside the block changes persistently on that date, and no cell clear of it does
    scene = offline_stack.scene
    first = np.asarray(r["series_first"])
    inside, touching = _cells_in_block(r["series_x"], r["series_y"], scene.change_bounds)
    assert r["series_crs"] == scene.epsg and inside.sum() >= 12, inside.sum()
    change_index = [t[:10] for t in r["series_times"]].index(str(scene.change_date.date()))
    assert (first[inside] == change_index).all(), first
    assert np.isin(first[touching], (-1, change_index)).all(), first
    assert (first[~touching] == -1).all(), first
    assert r["n_changed"] == int((first >= 0).sum())


def _cells_in_block(x, y, bounds):
    """Masks (y, x) of the grid cells (centres ``x``, ``y``) wholly inside ``bounds``, and touching it."""
    x, y = np.asarray(x), np.asarray(y)
    half_x, half_y = abs(x[1] - x[0]) / 2, abs(y[1] - y[0]) / 2
    left, bottom, right, top = bounds
    inside = ((y[:, None] - half_y >= bottom) & (y[:, None] + half_y <= top)
              & (x[None] - half_x >= left) & (x[None] + half_x <= right))
    touching = ((y[:, None] + half_y > bottom) & (y[:, None] - half_y < top)
                & (x[None] + half_x > left) & (x[None] - half_x < right))
    return inside, touching


def test_similarity_search(offline_stack):
    r = run_notebook("04_similarity_search.ipynb", offline_stack)
    assert r["error"] is None and r["n_matches"] == 15 and r["markers"] == 16
    assert r["query_similarity"] == pytest.approx(1.0, abs=1e-5) and r["best"] == pytest.approx(1.0, abs=1e-5)


def test_fewshot_landcover(offline_stack):
    r = run_notebook("05_fewshot_landcover.ipynb", offline_stack)
    assert r["tool_error"] is None and r["has_layer"] and r["predicted_valid"]
    assert len(r["names"]) >= 2 and all(not n.isdigit() for n in r["names"])
    assert r["n_train"] > 50 and r["accuracy"] is not None


def test_pretraining(offline_stack):
    import math

    r = run_notebook("06_pretraining.ipynb", offline_stack)
    assert Path(r["run_dir"]).parent == offline_stack.workdir
    assert (Path(r["run_dir"]) / "checkpoint.pth").exists()
    # the whole short run (5 epochs of 3 steps), all finite; metrics.csv holds the same numbers
    # the loop returned
    assert r["total_iters"] == r["iteration"] == len(r["losses"]) == 15
    assert all(math.isfinite(v) and 0 < v < 2 * math.log(256) for v in r["losses"])
    assert r["csv_loss"] == pytest.approx(r["losses"], rel=1e-6)
    # the export loads strictly (trained fusion included) and is the teacher, bit for bit
    assert r["fusion_trained"] and r["missing"] == []
    assert r["cls_diff"] == 0.0 and r["patch_diff"] == 0.0
    # the notebook's own model, folded for inference by embed: the same to float32 rounding
    assert r["notebook_model_diff"] < 1e-5
    # the exported teacher is the run's initial teacher moved by 15 EMA steps: changed, but far
    # closer to it than another seed's initialisation is
    assert 0 < r["moved"] < 0.1 * r["seed_gap"], (r["moved"], r["seed_gap"])
    assert sorted(r["modalities"]) == ["s1", "s2_l2a"]  # the two stems it was trained on
    # the embeddings carry the exported checkpoint's provenance and are on the map
    assert r["emb_sha"] == r["sha"] == r["file_sha"]
    assert r["depth"] == 64 and r["valid"] > 0.5 and r["finite_where_valid"]
    assert r["in_map"] and r["opaque"] > 0.5
