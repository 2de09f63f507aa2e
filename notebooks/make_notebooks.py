"""Write the analyst notebooks (no outputs) from the cell sources below: `python notebooks/make_notebooks.py`.

Keeping the sources here makes review and diffs readable; the .ipynb files are what users open.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

MODE_NOTE = """\
By default this notebook reads Sentinel-1/2 from **Microsoft Planetary Computer** and uses the
released **TerraFM-B** weights (downloaded from Hugging Face on first use). Set
`TERRAFM_NOTEBOOK_MODE=local` before starting Jupyter to run it offline on the local STAC
stand-in of the test suite (real Sentinel COGs) with an *untrained* tiny model: the pictures then
show the pipeline working, not TerraFM's quality."""

SETUP = """\
import terrafm
import terrafm.viz as viz
from terrafm.viz.notebook import open_notebook_area, first_date

cfg = open_notebook_area({purpose!r})
print("mode:", cfg.mode, "| area (lon/lat):", [round(v, 4) for v in cfg.bbox])"""

NOTEBOOKS = {
    "01_quickstart.ipynb": [
        ("md", "# 01 · Quickstart: from an area to an embedding map\n\n"
               "Search Sentinel-1/2 for a small area, embed it with TerraFM at the 160 m patch grid, "
               "colour the embeddings with PCA and put them on a map.\n\n" + MODE_NOTE),
        ("code", SETUP.format(purpose="quickstart")),
        ("md", "## Load imagery\n`terrafm.open_sentinel` searches the STAC API, signs the assets and "
               "returns a lazy `xarray.Dataset` (bands, cloud masks, CRS). We keep the least cloudy date."),
        ("code", "ds = terrafm.open_sentinel(cfg.bbox, cfg.start, cfg.end, **cfg.stac)\n"
                 "ds = first_date(ds)\nds"),
        ("md", "## Embed\nOne 64- (tiny) or 768-dimensional (base) vector per 16 × 16 px patch, with CRS "
               "and a `valid` mask (clouds → invalid)."),
        ("code", "emb = terrafm.embed(ds, **cfg.embed)\nemb"),
        ("md", "## Map\nThe first three principal components as red, green and blue. Similar colours = "
               "similar embeddings. Use the layer control to change the opacity."),
        ("code", "rgb = terrafm.to_rgb(emb, method=\"pca\")\n"
                 "m = viz.new_map(emb, toolbar=cfg.toolbar)\n"
                 "viz.add_embedding_layer(m, rgb, \"TerraFM embedding (PCA)\", opacity=0.85)\n"
                 "m.add_layer_control()\nm"),
    ],
    "02_umap_explorer.ipynb": [
        ("md", "# 02 · UMAP map with a linked scatter\n\n"
               "UMAP squeezes the embeddings into 2-D. Brush points in the scatter to see where they are "
               "on the map; click the map to find that place in the scatter.\n\n" + MODE_NOTE),
        ("code", SETUP.format(purpose="umap")),
        ("code", "ds = first_date(terrafm.open_sentinel(cfg.bbox, cfg.start, cfg.end, **cfg.stac))\n"
                 "emb = terrafm.embed(ds, **cfg.embed)"),
        ("md", "UMAP colours (3 components) for the map, a 2-D UMAP for the scatter."),
        ("code", "link = viz.UmapLink(emb, method=\"umap\", sample=cfg.umap_sample)\n"
                 "umap_rgb = terrafm.to_rgb(emb, method=\"umap\", sample=cfg.umap_sample)\n"
                 "viz.add_embedding_layer(link.map, umap_rgb, \"UMAP colours\", opacity=0.85)\n"
                 "link"),
    ],
    "03_change_detection.ipynb": [
        ("md", "# 03 · Change between two seasons\n\n"
               "Embed the least cloudy date of each season on the same grid; the cosine distance between "
               "the two embeddings of a place measures how much it changed. Pick the dates and the "
               "threshold with the widgets (Otsu's threshold to start).\n\n" + MODE_NOTE),
        ("code", SETUP.format(purpose="change")),
        ("code", "(a_start, a_end), (b_start, b_end) = cfg.seasons\n"
                 "ds_a = first_date(terrafm.open_sentinel(cfg.bbox, a_start, a_end, **cfg.stac))\n"
                 "ds_b = first_date(terrafm.open_sentinel(cfg.bbox, b_start, b_end, **cfg.stac))\n"
                 "ds_b = ds_b.odc.reproject(ds_a.odc.geobox)  # exactly the same grid as season A\n"
                 "import xarray as xr\n"
                 "# keep what both seasons have (a season may lack a Sentinel-1 pass within its window)\n"
                 "common = [v for v in ds_a.data_vars if v in ds_b.data_vars]\n"
                 "ds = xr.concat([ds_a[common], ds_b[common]], dim=\"time\")\n"
                 "both = [k for k in ds_a.attrs[\"terrafm_modalities\"] if k in ds_b.attrs[\"terrafm_modalities\"]]\n"
                 "ds.attrs = {**ds_a.attrs, \"terrafm_modalities\": both}\n"
                 "print(\"modalities on both dates:\", both)\n"
                 "emb = terrafm.embed(ds, **cfg.embed)\n"
                 "emb.sizes"),
        ("code", "result = terrafm.change(emb.isel(time=0), emb.isel(time=1))\n"
                 "print(f\"Otsu threshold {result.attrs['threshold']:.3f}; \"\n"
                 "      f\"{100 * float(result.changed.mean()):.1f}% of valid positions changed\")"),
        ("code", "app = viz.ChangeExplorer(emb, toolbar=cfg.toolbar)\napp"),
    ],
    "04_similarity_search.ipynb": [
        ("md", "# 04 · Similarity search\n\n"
               "Click anywhere on the map: every position is coloured by how similar its embedding is to "
               "the clicked one, and the most similar places are marked.\n\n" + MODE_NOTE),
        ("code", SETUP.format(purpose="similarity")),
        ("code", "ds = first_date(terrafm.open_sentinel(cfg.bbox, cfg.start, cfg.end, **cfg.stac))\n"
                 "emb = terrafm.embed(ds, **cfg.embed)"),
        ("md", "The app starts with a query in the middle of the area (the same call a click makes)."),
        ("code", "app = viz.SimilarityExplorer(emb, k=15, toolbar=cfg.toolbar)\n"
                 "west, south, east, north = cfg.bbox\n"
                 "app.click((west + east) / 2, (south + north) / 2)\n"
                 "app"),
        ("code", "app.matches.head()  # the top matches as a GeoDataFrame (EPSG:4326)"),
    ],
    "05_fewshot_landcover.ipynb": [
        ("md", "# 05 · Few-shot land cover with WorldCover labels\n\n"
               "ESA WorldCover (10 m) gives labels; a small classifier on the embeddings learns them from a "
               "few hundred cells (spatially blocked cross-validation reports honest accuracy). Then "
               "refine by hand with the labelling tool: click to label, the class map retrains.\n\n"
               + MODE_NOTE),
        ("code", SETUP.format(purpose="landcover")),
        ("code", "ds = terrafm.open_sentinel(cfg.bbox, cfg.start, cfg.end, **cfg.stac,\n"
                 "                           collections=(\"sentinel-2-l2a\", \"sentinel-1-rtc\", \"esa-worldcover\"))\n"
                 "ds = first_date(ds)\n"
                 "emb = terrafm.embed(ds, **cfg.embed).isel(time=0)\n"
                 "worldcover = ds[\"worldcover\"].compute()"),
        ("code", "WORLDCOVER = {10: \"tree cover\", 20: \"shrubland\", 30: \"grassland\", 40: \"cropland\",\n"
                 "              50: \"built-up\", 60: \"bare\", 70: \"snow/ice\", 80: \"water\",\n"
                 "              90: \"wetland\", 95: \"mangroves\", 100: \"moss/lichen\"}\n"
                 "clf = terrafm.fit_classifier(emb, worldcover, method=\"linear\", block_size=4)\n"
                 "names = [WORLDCOVER.get(int(c), str(c)) for c in clf.classes]\n"
                 "print(\"classes:\", names)\n"
                 "print({k: v for k, v in clf.report.items() if k in ('accuracy', 'macro_f1', 'n_train')})"),
        ("code", "prediction = clf.predict(emb)\n"
                 "m = viz.new_map(emb, toolbar=cfg.toolbar)\n"
                 "viz.add_embedding_layer(m, terrafm.to_rgb(emb), \"embedding (PCA)\", opacity=0.9, legend=False)\n"
                 "viz.add_embedding_layer(m, prediction[\"class\"], \"predicted land cover\", kind=\"categorical\",\n"
                 "                        classes=names, opacity=0.7)\n"
                 "m"),
        ("md", "## Label by hand\nPick a class, click the map (or draw a polygon); after two classes "
               "the class map appears and updates with every label. `tool.export(\"labels.parquet\")` "
               "writes GeoParquet."),
        ("code", "tool = viz.LabelTool(emb, classes=[\"water\", \"built-up\", \"vegetation\"], toolbar=cfg.toolbar)\n"
                 "tool"),
    ],
    "06_pretraining.ipynb": [
        ("md", "# 06 · A small pretraining run\n\n"
               "Pretrain TerraFM yourself with the `pretrain` package (DINO self-distillation with multi-crop, "
               "modality augmentation and dual centering, paper §3.2), export the teacher, and use it for "
               "embeddings exactly like the released weights. A notebook run is a smoke run on a CPU; real "
               "runs use `torchrun -m pretrain.train --config vitb_paper` on GPUs (see `pretrain/README.md`).\n\n"
               "**Data.** By default this notebook reads a Major-TOM Core download from `TERRAFM_MAJORTOM_ROOT` "
               "(default `data/majortom`). Get a few shards from Hugging Face, e.g.\n\n"
               "```bash\n"
               "huggingface-cli download Major-TOM/Core-S2L2A --repo-type dataset \\\n"
               "    --include 'images/part_00001.parquet' --local-dir data/majortom/Core-S2L2A\n"
               "```\n\n"
               "(Core-S1RTC and Core-S2L1C the same way; the three datasets are joined by `grid_cell`, so "
               "add those modalities only for cells present in all of them.) The default run uses the "
               "`tiny_cpu` recipe on Sentinel-2 L2A for 160 iterations and then embeds the Planetary Computer "
               "area of the other notebooks.\n\n"
               "Set `TERRAFM_NOTEBOOK_MODE=local` to run offline: a tiny Major-TOM-format dataset is built "
               "from the real BigEarthNet S1 + S2 example patches, 15 iterations of `tiny_cpu` run in seconds, "
               "and the local STAC stand-in provides the area to embed. Fifteen steps show the machinery "
               "working, not a useful model."),
        ("code", "import pandas as pd\n"
                 "import terrafm\n"
                 "import terrafm.viz as viz\n"
                 "from terrafm.viz.notebook import first_date, open_notebook_area, open_pretraining_data\n"
                 "from pretrain.config import load_config\n"
                 "from pretrain.export import export_teacher\n"
                 "from pretrain.train import train\n\n"
                 "setup = open_pretraining_data()\n"
                 "train_cfg = load_config(setup.config, setup.overrides)\n"
                 "print(\"mode:\", setup.mode, \"| data:\", setup.root)\n"
                 "print(train_cfg.model.name, \"|\", train_cfg.total_iters, \"iterations of\", train_cfg.optim.batch_size,\n"
                 "      \"samples |\", train_cfg.data.modalities)"),
        ("md", "## Train\nCheckpoints go to `run.output_dir`; running the cell again continues the run "
               "(`resume=\"auto\"`)."),
        ("code", "losses = train(train_cfg, resume=\"auto\", device=\"auto\")\n"
                 "print(f\"{len(losses)} iterations, last loss {losses[-1]:.3f}\" if losses else \"run already finished\")"),
        ("md", "## Loss curve\nFrom `metrics.csv` (iteration, name, value). The DINO loss is the teacher's "
               "entropy plus KL(teacher ‖ student); the entropy rises while the centers settle, so watch "
               "the KL part, which the student minimises, and the entropy (near 0 or near log K = collapse)."),
        ("code", "import matplotlib.pyplot as plt\n\n"
                 "metrics = pd.read_csv(setup.output_dir / \"metrics.csv\")\n"
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
        ("code", "weights = export_teacher(setup.output_dir / \"checkpoint.pth\", setup.output_dir / \"terrafm_pretrained.pth\")\n"
                 "model = terrafm.create_model(train_cfg.model.name, weights=weights).eval()\n"
                 "print(weights, \"sha256\", model.checkpoint_sha256[:12])"),
        ("md", "## Embed with your model\nThe same area as the other notebooks, embedded by the model you just "
               "trained, coloured by PCA."),
        ("code", "cfg = open_notebook_area(\"pretraining\")\n"
                 "ds = first_date(terrafm.open_sentinel(cfg.bbox, cfg.start, cfg.end, **cfg.stac))\n"
                 "trained = [k for k in train_cfg.data.modalities if k in ds.attrs[\"terrafm_modalities\"]]  # stems it learned\n"
                 "emb = terrafm.embed(ds, **{**cfg.embed, \"model\": model, \"weights\": None, \"modalities\": trained})\n"
                 "m = viz.new_map(emb, toolbar=cfg.toolbar)\n"
                 "viz.add_embedding_layer(m, terrafm.to_rgb(emb, method=\"pca\"), \"pretrained embedding (PCA)\", opacity=0.85)\n"
                 "m"),
    ],
}


def build() -> list[Path]:
    written = []
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src)
                                 for kind, src in cells])
        for i, cell in enumerate(nb.cells):  # stable ids: regenerating gives a clean diff
            cell.id = f"cell-{i:02d}"
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        path = HERE / name
        nbformat.write(nb, path)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in build():
        print(path)
