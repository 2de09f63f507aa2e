"""Write the analyst notebooks (no outputs) from the cell sources below: `python notebooks/make_notebooks.py`.

Keeping the sources here makes review and diffs readable; the .ipynb files are what users open.
Each notebook's first code cell holds its settings (catalog URL, model, weights, area, dates), tagged
``parameters``: `notebooks/offline.py` rewrites that cell, and only that cell, to run offline.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

MODE_NOTE = """\
By default this notebook reads Sentinel-1/2 from **Microsoft Planetary Computer** and uses the
released **TerraFM-B** weights (downloaded from Hugging Face on first use): the settings cell
below says so, and it is the only cell to edit for another area, dates, catalog or model.
`python notebooks/offline.py run|voila|lab` (from the repository checkout) runs it offline: it
rewrites only that cell, pointing `CATALOG_URL` at a local STAC API over real Sentinel COGs and
`MODEL` at an *untrained* tiny TerraFM, so the pictures then show the pipeline working, not
TerraFM's quality."""

SWITCH_COMMENT = (
    "# Settings: the only cell to edit. `python notebooks/offline.py` rewrites it to run offline\n"
    "# (a local STAC API, an untrained tiny model); every other cell stays as it is.\n")
CATALOG = "CATALOG_URL = None  # STAC API URL; None = Microsoft Planetary Computer (assets signed)\n"
MODEL = ("MODEL = \"terrafm_base\"  # TerraFM-B, ViT-B/16\n"
         "WEIGHTS = \"hf\"  # the released weights from Hugging Face; \"random\" = untrained\n")
AREA = "BBOX = (11.53, 48.10, 11.61, 48.15)  # west, south, east, north (lon/lat): Munich west, ~6 x 5.5 km\n"
DATES = "DATES = \"2023-06-01/2023-06-30\"  # STAC datetime range; the least cloudy date is used\n"
TOOLBAR = "TOOLBAR = True  # leafmap's toolbar (its ipyevents front end comes from a CDN)"


def settings(*lines: str) -> str:
    return SWITCH_COMMENT + "".join(lines)


IMPORTS = "import terrafm\nimport terrafm.viz as viz"

SEARCH_LOAD = """\
items = terrafm.stac.search(BBOX, DATES, collections=("sentinel-2-l2a", "sentinel-1-rtc"),
                            url=CATALOG_URL, max_cloud=30)
ds = terrafm.stac.load(items, BBOX)
# keep the least cloudy date: the one with the largest share of valid Sentinel-2 pixels
clear = ds.mask_s2_l2a.mean(("y", "x")).compute()
ds = ds.isel(time=[int(clear.argmax())])"""

EMBED = "emb = terrafm.embed(ds, model=MODEL, weights=WEIGHTS)"

NOTEBOOKS = {
    "01_quickstart.ipynb": [
        ("md", "# 01 · Quickstart: from an area to an embedding map\n\n"
               "Search Sentinel-1/2 for a small area, embed it with TerraFM at the 160 m patch grid, "
               "colour the embeddings with PCA and put them on a map.\n\n" + MODE_NOTE),
        ("settings", settings(CATALOG, MODEL, AREA, DATES, TOOLBAR)),
        ("code", IMPORTS),
        ("md", "## Load imagery\n`terrafm.stac.search` asks the STAC API for Sentinel-2 L2A and "
               "Sentinel-1 RTC items over the area (Planetary Computer items come back signed); "
               "`terrafm.stac.load` puts them on one 10 m UTM grid as a lazy `xarray.Dataset` (bands, "
               "cloud and nodata masks, CRS)."),
        ("code", SEARCH_LOAD + "\nds"),
        ("md", "## Embed\nOne vector (768 numbers for TerraFM-B) per 16 × 16 px patch, on a 160 m grid "
               "with CRS and a `valid` mask (clouds → invalid)."),
        ("code", EMBED + "\nemb"),
        ("md", "## Map\nThe first three principal components as red, green and blue. Similar colours = "
               "similar embeddings. Use the layer control to change the opacity."),
        ("code", "rgb = terrafm.to_rgb(emb, method=\"pca\")\n"
                 "m = viz.new_map(emb, toolbar=TOOLBAR)\n"
                 "viz.add_embedding_layer(m, rgb, \"TerraFM embedding (PCA)\", opacity=0.85)\n"
                 "m.add_layer_control()\nm"),
    ],
    "02_umap_explorer.ipynb": [
        ("md", "# 02 · UMAP map with a linked scatter\n\n"
               "UMAP squeezes the embeddings into 2-D. Brush points in the scatter to see where they are "
               "on the map; click the map to find that place in the scatter.\n\n" + MODE_NOTE),
        ("settings", settings(CATALOG, MODEL, AREA, DATES, TOOLBAR)),
        ("code", IMPORTS),
        ("code", SEARCH_LOAD + "\n" + EMBED),
        ("md", "UMAP colours (3 components) for the map, a 2-D UMAP for the scatter, each fitted on "
               "up to 20,000 valid cells."),
        ("code", "link = viz.UmapLink(emb, method=\"umap\", sample=20_000, toolbar=TOOLBAR)\n"
                 "umap_rgb = terrafm.to_rgb(emb, method=\"umap\", sample=20_000)\n"
                 "viz.add_embedding_layer(link.map, umap_rgb, \"UMAP colours\", opacity=0.85)\n"
                 "link"),
    ],
    "03_change_detection.ipynb": [
        ("md", "# 03 · Change between two seasons, and over a series\n\n"
               "Embed the least cloudy date of each season on the same grid; the cosine distance between "
               "the two embeddings of a place measures how much it changed. Pick the dates and the "
               "threshold with the widgets (Otsu's threshold to start).\n\n" + MODE_NOTE),
        ("settings", settings(
            CATALOG, MODEL, AREA,
            "BEFORE = \"2023-06-01/2023-06-30\"  # first season (STAC datetime range)\n"
            "AFTER = \"2023-09-01/2023-09-30\"  # second season\n"
            "SERIES = \"2023-04-01/2023-10-31\"  # every clear Sentinel-2 date in this range, as one series\n"
            "SERIES_STORE = \"change_series.zarr\"  # the series' embedding store (rerunning resumes it)\n",
            TOOLBAR)),
        ("code", IMPORTS),
        ("md", "Both seasons are loaded in one call, so every date lies on the same grid. From each "
               "season we keep its least cloudy date, and we embed only the modalities seen on both "
               "(a season may lack a Sentinel-1 pass): otherwise a change of inputs would look like a "
               "change on the ground."),
        ("code", "items = []\n"
                 "for season in (BEFORE, AFTER):\n"
                 "    items += terrafm.stac.search(BBOX, season, collections=(\"sentinel-2-l2a\", \"sentinel-1-rtc\"),\n"
                 "                                 url=CATALOG_URL, max_cloud=30)\n"
                 "ds = terrafm.stac.load(items, BBOX)\n"
                 "clear = ds.mask_s2_l2a.mean((\"y\", \"x\")).compute()  # share of valid Sentinel-2 pixels per date\n"
                 "dates = [clear.sel(time=slice(*season.split(\"/\"))).idxmax(\"time\").values for season in (BEFORE, AFTER)]\n"
                 "ds = ds.sel(time=dates)\n"
                 "masks = [name for name in ds.data_vars if name.startswith(\"mask_\")]\n"
                 "both = [name.removeprefix(\"mask_\") for name in masks if bool(ds[name].any((\"y\", \"x\")).all())]\n"
                 "print(\"dates:\", [str(d)[:10] for d in dates], \"| modalities on both:\", both)\n"
                 "emb = terrafm.embed(ds, model=MODEL, weights=WEIGHTS, modalities=both)\n"
                 "emb.sizes"),
        ("code", "result = terrafm.change(emb.isel(time=0), emb.isel(time=1))\n"
                 "print(f\"Otsu threshold {result.attrs['threshold']:.3f}; \"\n"
                 "      f\"{100 * float(result.changed.mean()):.1f}% of valid positions changed\")"),
        ("code", "app = viz.ChangeExplorer(emb, toolbar=TOOLBAR)\napp"),
        ("md", "## A season, date by date\n\n"
               "Two dates say *whether* a place changed; a series says *when*, and whether it lasted. Every "
               "clear Sentinel-2 date of `SERIES` is embedded into one `(time, y, x, embedding)` store "
               "(rerunning the cell resumes it). `first_persistent_change` compares each date with the "
               "baseline (the first date) and keeps, per position, the first date from which the distance "
               "stays above Otsu's threshold for two valid dates in a row: a cloud or a one-date blip is "
               "not a change.\n\n"
               "Drag the **date** slider to see each date's distance to the baseline; **click the map** to "
               "plot that position's distance over time, with the threshold dashed and its change date in "
               "red. (Offline, `notebooks/offline.py`'s test scene holds one known change: from 2021-06-15 "
               "an 840 m square of salt marsh in the upper right of the area shows a field's real pixels; "
               "click it to see that date marked.)"),
        ("code", "series_items = terrafm.stac.search(BBOX, SERIES, collections=(\"sentinel-2-l2a\",), url=CATALOG_URL,\n"
                 "                                   max_cloud=60)\n"
                 "series_ds = terrafm.stac.load(series_items, BBOX)\n"
                 "clear = series_ds.mask_s2_l2a.mean((\"y\", \"x\")).compute()\n"
                 "series_ds = series_ds.sel(time=clear.time[clear > 0.5])  # dates at least half clear\n"
                 "series = terrafm.embed(series_ds, model=MODEL, weights=WEIGHTS, modalities=[\"s2_l2a\"], out=SERIES_STORE)\n"
                 "first = terrafm.analysis.first_persistent_change(series, baseline=1, min_steps=2)\n"
                 "print(f\"{series.sizes['time']} dates; threshold {first.attrs['threshold']:.3f}; \"\n"
                 "      f\"{100 * float((first.first_change_index >= 0).mean()):.1f}% of positions changed persistently\")"),
        ("code", "series_app = viz.ChangeExplorer(series, baseline=1, min_steps=2, toolbar=TOOLBAR)\nseries_app"),
    ],
    "04_similarity_search.ipynb": [
        ("md", "# 04 · Similarity search\n\n"
               "Click anywhere on the map: every position is coloured by how similar its embedding is to "
               "the clicked one, and the most similar places are marked. Then embed a second date into a "
               "second store and search both stores at once through a vector index.\n\n" + MODE_NOTE),
        ("settings", settings(
            CATALOG, MODEL, AREA, DATES,
            "AFTER = \"2023-09-01/2023-09-30\"  # a second date range, embedded into a second store\n"
            "STORES = \"similarity_stores\"  # folder of the two embedding stores (zarr)\n", TOOLBAR)),
        ("code", IMPORTS),
        ("md", "Sentinel-2 only, on both dates below: stores searched together should hold the same inputs "
               "(a date may lack a Sentinel-1 pass). The embeddings go into a zarr store (`out=`): rerunning "
               "the cell resumes it instead of recomputing. The area is small, so we also load them into "
               "memory for the map."),
        ("code", "items = terrafm.stac.search(BBOX, DATES, collections=(\"sentinel-2-l2a\",), url=CATALOG_URL, max_cloud=30)\n"
                 "ds = terrafm.stac.load(items, BBOX)\n"
                 "clear = ds.mask_s2_l2a.mean((\"y\", \"x\")).compute()  # share of valid pixels per date\n"
                 "ds = ds.isel(time=[int(clear.argmax())])  # the least cloudy date\n"
                 "emb = terrafm.embed(ds, model=MODEL, weights=WEIGHTS, out=f\"{STORES}/first_date.zarr\").load()"),
        ("md", "The app starts with a query in the middle of the area (the same call a click makes)."),
        ("code", "app = viz.SimilarityExplorer(emb, k=15, toolbar=TOOLBAR)\n"
                 "west, south, east, north = BBOX\n"
                 "app.click((west + east) / 2, (south + north) / 2)\n"
                 "app"),
        ("code", "app.matches.head()  # the top matches as a GeoDataFrame (EPSG:4326)"),
        ("md", "## Search every store: a second date\n"
               "Embed the least cloudy date of `AFTER` into a second store, then build a "
               "`terrafm.analysis.VectorIndex` over both stores. One search covers every store and every "
               "date; each hit says where it comes from (`store`, `time`) with its cosine `score`. A "
               "(lon, lat) query is looked up in every store covering it, at every date; those cells "
               "themselves are left out of the results."),
        ("code", "from pathlib import Path\n\n"
                 "items_after = terrafm.stac.search(BBOX, AFTER, collections=(\"sentinel-2-l2a\",), url=CATALOG_URL,\n"
                 "                                  max_cloud=30)\n"
                 "ds_after = terrafm.stac.load(items_after, BBOX)\n"
                 "clear_after = ds_after.mask_s2_l2a.mean((\"y\", \"x\")).compute()\n"
                 "ds_after = ds_after.isel(time=[int(clear_after.argmax())])\n"
                 "emb_after = terrafm.embed(ds_after, model=MODEL, weights=WEIGHTS, out=f\"{STORES}/second_date.zarr\")\n"
                 "# overwrite=True: replace the index an earlier run of this notebook saved\n"
                 "index = terrafm.analysis.VectorIndex.build([f\"{STORES}/first_date.zarr\", f\"{STORES}/second_date.zarr\"],\n"
                 "                                           overwrite=True)\n"
                 "index.save()  # beside the first store; terrafm.analysis.VectorIndex.open(index.path) reopens it\n"
                 "hits = index.search(((west + east) / 2, (south + north) / 2), k=15)\n"
                 "hits[\"store\"] = [Path(store).name for store in hits[\"store\"]]  # results hold the full path\n"
                 "hits[[\"store\", \"time\", \"lon\", \"lat\", \"score\"]]"),
        ("md", "The explorer above now searches the index: a click marks the best places of both dates "
               "(popup: store, date, score), and `app.results` holds them. "
               "`viz.SimilarityExplorer(emb, index=index)` opens a new map that does the same."),
        ("code", "app.set_index(index)  # repeats the last query, now in both stores\n"
                 "app.results[\"store\"].value_counts()  # the 15 best places, by store"),
    ],
    "05_fewshot_landcover.ipynb": [
        ("md", "# 05 · Few-shot land cover with WorldCover labels\n\n"
               "ESA WorldCover (10 m) gives labels; a small classifier on the embeddings learns them from a "
               "few hundred cells (spatially blocked cross-validation reports honest accuracy). Then "
               "refine by hand with the labelling tool: click to label, the class map retrains.\n\n"
               + MODE_NOTE),
        ("settings", settings(CATALOG, MODEL, AREA, DATES, TOOLBAR)),
        ("code", IMPORTS),
        ("md", "The imagery as in the other notebooks, plus the ESA WorldCover 2021 map (one item for "
               "the year, loaded on the same grid as the variable `worldcover`)."),
        ("code", SEARCH_LOAD.replace(
            "ds = terrafm.stac.load(items, BBOX)",
            "items += terrafm.stac.search(BBOX, \"2021-01-01/2021-12-31\", collections=(\"esa-worldcover\",),\n"
            "                             url=CATALOG_URL)\n"
            "ds = terrafm.stac.load(items, BBOX)") + "\n"
                 "emb = terrafm.embed(ds, model=MODEL, weights=WEIGHTS).isel(time=0)\n"
                 "worldcover = ds[\"worldcover\"].compute()"),
        ("code", "WORLDCOVER = {10: \"tree cover\", 20: \"shrubland\", 30: \"grassland\", 40: \"cropland\",\n"
                 "              50: \"built-up\", 60: \"bare\", 70: \"snow/ice\", 80: \"water\",\n"
                 "              90: \"wetland\", 95: \"mangroves\", 100: \"moss/lichen\"}\n"
                 "clf = terrafm.fit_classifier(emb, worldcover, method=\"linear\", block_size=4)\n"
                 "names = [WORLDCOVER.get(int(c), str(c)) for c in clf.classes]\n"
                 "print(\"classes:\", names)\n"
                 "print({k: v for k, v in clf.report.items() if k in ('accuracy', 'macro_f1', 'n_train')})"),
        ("code", "prediction = clf.predict(emb)\n"
                 "m = viz.new_map(emb, toolbar=TOOLBAR)\n"
                 "viz.add_embedding_layer(m, terrafm.to_rgb(emb), \"embedding (PCA)\", opacity=0.9, legend=False)\n"
                 "viz.add_embedding_layer(m, prediction[\"class\"], \"predicted land cover\", kind=\"categorical\",\n"
                 "                        classes=names, opacity=0.7)\n"
                 "m"),
        ("md", "## Label by hand\nPick a class, click the map (or draw a polygon); after two classes "
               "the class map appears and updates with every label. `tool.export(\"labels.parquet\")` "
               "writes GeoParquet."),
        ("code", "tool = viz.LabelTool(emb, classes=[\"water\", \"built-up\", \"vegetation\"], toolbar=TOOLBAR)\n"
                 "tool"),
    ],
    "06_pretraining.ipynb": [
        ("md", "# 06 · A small pretraining run\n\n"
               "Pretrain TerraFM yourself with the `pretrain` package (DINO self-distillation with multi-crop, "
               "modality augmentation and dual centering, paper §3.2), export the teacher, and use it for "
               "embeddings exactly like the released weights. A notebook run is a smoke run on a CPU; real "
               "runs use `torchrun -m pretrain.train --config vitb_paper` on GPUs (see `pretrain/README.md`).\n\n"
               "**Data.** A Major-TOM Core download in `MAJORTOM_ROOT`. Get a few shards from Hugging Face, e.g.\n\n"
               "```bash\n"
               "huggingface-cli download Major-TOM/Core-S2L2A --repo-type dataset \\\n"
               "    --include 'images/part_00001.parquet' --local-dir data/majortom/Core-S2L2A\n"
               "```\n\n"
               "(Core-S1RTC and Core-S2L1C the same way; the three datasets are joined by `grid_cell`, so "
               "add those modalities only for cells present in all of them.) The settings run the "
               "`tiny_cpu` recipe on Sentinel-2 L2A for 10 epochs of 128 samples (160 iterations) and then "
               "embed the Planetary Computer area of the other notebooks.\n\n"
               "`python notebooks/offline.py run|voila|lab 06_pretraining.ipynb` runs it offline: it builds a "
               "tiny Major-TOM-format dataset from the real BigEarthNet S1 + S2 example patches, trains "
               "15 iterations (seconds) and embeds an area of the local STAC stand-in. Fifteen steps show "
               "the machinery working, not a useful model."),
        ("settings", settings(
            "from pathlib import Path\n\n"
            "MAJORTOM_ROOT = Path(\"data/majortom\")  # Core-S2L2A/images/part_*.parquet (+ optional cell_stats.csv)\n"
            "MODALITIES = [\"s2_l2a\"]  # the Core datasets downloaded (s2_l2a, s1, s2_l1c)\n"
            "EPOCHS = 10  # of the tiny_cpu recipe (batch 8)\n"
            "EPOCH_SAMPLES = 128  # 16 iterations per epoch\n"
            "RUN_DIR = Path(\"runs/notebook06\")  # checkpoint.pth, metrics.csv, the exported weights\n",
            CATALOG, AREA, DATES, TOOLBAR)),
        ("code", "import matplotlib.pyplot as plt\n"
                 "import pandas as pd\n"
                 "import terrafm\n"
                 "import terrafm.viz as viz\n"
                 "from pretrain.config import load_config\n"
                 "from pretrain.export import export_teacher\n"
                 "from pretrain.train import train\n\n"
                 "if not any(MAJORTOM_ROOT.glob(\"*S2L2A/images/*.parquet\")):\n"
                 "    raise FileNotFoundError(f\"no Major-TOM Core-S2L2A parquet under {MAJORTOM_ROOT.resolve()}: download a \"\n"
                 "                            \"shard (see above) or point MAJORTOM_ROOT at your copy\")\n"
                 "overrides = [f\"data.root={MAJORTOM_ROOT}\", f\"data.modalities={MODALITIES}\", f\"optim.epochs={EPOCHS}\",\n"
                 "             f\"optim.epoch_samples={EPOCH_SAMPLES}\", f\"run.output_dir={RUN_DIR}\"]\n"
                 "if (MAJORTOM_ROOT / \"cell_stats.csv\").exists():  # frequent classes for dual centering\n"
                 "    overrides.append(f\"data.cell_stats={MAJORTOM_ROOT / 'cell_stats.csv'}\")\n"
                 "train_cfg = load_config(\"tiny_cpu\", overrides)\n"
                 "print(train_cfg.model.name, \"|\", train_cfg.total_iters, \"iterations of\", train_cfg.optim.batch_size,\n"
                 "      \"samples |\", train_cfg.data.modalities)"),
        ("md", "## Train\nCheckpoints go to `RUN_DIR`; running the cell again continues the run "
               "(`resume=\"auto\"`)."),
        ("code", "losses = train(train_cfg, resume=\"auto\", device=\"auto\")\n"
                 "print(f\"{len(losses)} iterations, last loss {losses[-1]:.3f}\" if losses else \"run already finished\")"),
        ("md", "## Loss curve\nFrom `metrics.csv` (iteration, name, value). The DINO loss is the teacher's "
               "entropy plus KL(teacher ‖ student); the entropy rises while the centers settle, so watch "
               "the KL part, which the student minimises, and the entropy (near 0 or near log K = collapse)."),
        ("code", "metrics = pd.read_csv(RUN_DIR / \"metrics.csv\")\n"
                 "curves = metrics.pivot_table(index=\"iteration\", columns=\"name\", values=\"value\")\n"
                 "fig, ax = plt.subplots(figsize=(7, 3.5))\n"
                 "ax.plot(curves.index, curves[\"loss\"], label=\"DINO loss\")\n"
                 "ax.plot(curves.index, curves[\"teacher_entropy\"], label=\"teacher entropy\")\n"
                 "ax.plot(curves.index, curves[\"loss\"] - curves[\"teacher_entropy\"], label=\"KL (loss - entropy)\")\n"
                 "ax.set_xlabel(\"iteration\")\n"
                 "ax.legend()\n"
                 "plt.show()"),
        ("md", "## Export and load\n`pretrain.export` (also `python -m pretrain.export CHECKPOINT OUT`) writes "
               "the teacher backbone in the release layout, with the trained fusion; `terrafm.create_model` "
               "loads it strictly."),
        ("code", "weights = export_teacher(RUN_DIR / \"checkpoint.pth\", RUN_DIR / \"terrafm_pretrained.pth\", overwrite=True)\n"
                 "model = terrafm.create_model(train_cfg.model.name, weights=weights).eval()\n"
                 "print(weights, \"sha256\", model.checkpoint_sha256[:12])"),
        ("md", "## Embed with your model\nThe same area as the other notebooks, embedded by the model you just "
               "trained (only the modalities it learned), coloured by PCA."),
        ("code", SEARCH_LOAD + "\n"
                 "learned = [k for k in train_cfg.data.modalities if f\"mask_{k}\" in ds]  # trained stems with data here\n"
                 "emb = terrafm.embed(ds, model=model, modalities=learned)\n"
                 "m = viz.new_map(emb, toolbar=TOOLBAR)\n"
                 "viz.add_embedding_layer(m, terrafm.to_rgb(emb, method=\"pca\"), \"pretrained embedding (PCA)\", opacity=0.85)\n"
                 "m"),
    ],
}


def build(dest: Path = HERE) -> list[Path]:
    """Write every notebook into ``dest``; returns the paths."""
    written = []
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src)
                                 for kind, src in cells])
        [parameters] = [cell for cell, (kind, _) in zip(nb.cells, cells) if kind == "settings"]
        parameters.metadata["tags"] = ["parameters"]  # papermill's name; notebooks/offline.py rewrites this cell
        for i, cell in enumerate(nb.cells):  # stable ids: regenerating gives a clean diff
            cell.id = f"cell-{i:02d}"
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        path = Path(dest) / name
        nbformat.write(nb, path)
        written.append(path)
    return written


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in build():
        logging.info("wrote %s", path)
