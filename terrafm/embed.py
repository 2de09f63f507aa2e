"""``terrafm.embed``: any area of a Sentinel Dataset -> georeferenced TerraFM embeddings.

Scale-out on dask.distributed: pass ``client=`` (a ``distributed.Client``). The model is
broadcast once; each worker process builds its own copy on first use and keeps it (run one
worker per GPU with ``threads_per_worker=1``, e.g. ``LocalCUDACluster`` or
``LocalCluster(n_workers=n_gpus, threads_per_worker=1)``). Each worker gets a device of its own
(:func:`worker_devices`: an explicit device list, else the GPUs of a host spread over its
workers); blocks ask for ``resources={"GPU": 1}`` when workers advertise GPUs. Every block
becomes one task that reads its window of the lazy Dataset on the worker, runs the model, and
writes its zarr region (with ``out=``) or returns its arrays. Blocks never mix in a batch, so the
result equals the single-process one; the blocks of a worker that dies are rerun by dask.

Examples
--------
>>> import terrafm  # doctest: +SKIP
>>> emb = terrafm.embed(ds, model="terrafm_base", weights="hf", out="aoi.zarr")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import xarray as xr

from . import prepare, sensors
from .engine import ModalityInput
from .store import (EMBEDDING_VAR, check_output_path, open_embedding, replace_with, serialisable_attrs,
                    sources_of, temporary_sibling, write_zarr)
from .sensors import PATCH_SIZE

__all__ = ["embed", "prepare_inputs"]

logger = logging.getLogger(__name__)

NORMALIZATION = f"x' = {sensors.NORMALIZATION_FORMULA}; S1 linear power -> dB first (TerraTorch PR #947)"


# ---------------------------------------------------------------------- inputs
def _geobox(ds: xr.Dataset):
    import odc.geo.xr  # noqa: F401  (registers .odc)

    if "y" not in ds.dims or "x" not in ds.dims:
        raise ValueError(f"the Dataset needs spatial dims 'y' and 'x', it has {tuple(ds.dims)}; "
                         "load it with terrafm.stac.load or rename the dims (ds.rename(lat='y', lon='x'))")
    for dim in ("y", "x"):
        step = np.diff(np.asarray(ds[dim].values, dtype="float64"))
        if len(step) and (step[0] == 0 or np.abs(step - step[0]).max() > 1e-6 * abs(step[0])):
            raise ValueError(
                f"the Dataset's {dim!r} coordinate is not a regular grid (steps from {step.min():g} to {step.max():g}), "
                "e.g. Sentinel-2 L2A and L1C (or S1) of different grids merged with xr.merge. Load them together "
                "with terrafm.stac.load(items) (one GeoBox), or reproject one onto the other first "
                "(b = b.odc.reproject(a.odc.geobox)).")
    gbox = ds.odc.geobox
    if gbox is None or gbox.crs is None:
        raise ValueError("the Dataset has no CRS: it needs a 'spatial_ref' coordinate. Fix: "
                         "ds = ds.rio.write_crs('EPSG:32633') (the imagery's CRS) or load it with "
                         "terrafm.stac.load")
    return gbox


def prepare_inputs(ds: xr.Dataset, modalities: Sequence[str] | None = None,
                   ) -> tuple[dict[str, ModalityInput], bool]:
    """Model inputs and validity masks per modality, lazily.

    Accepts either stored bands (``<key>_<band>``: ``s2_l2a_B01``…, ``s2_l1c_B01``…, ``s1_vv``,
    ``s1_vh``; optional ``mask_<key>``) or the output of ``terrafm.prepare.normalize`` (variables
    named by modality key with a ``band_<key>`` dim). Each modality reaches its own stem.

    Returns
    -------
    dict key -> :class:`terrafm.engine.ModalityInput` (data ``([time,] band, y, x)``, validity
    ``([time,] y, x)``; stored bands are flagged ``raw`` and normalized block by block with
    :func:`terrafm.prepare.normalize_block`), and whether the input has a time dim.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> ds = xr.Dataset({"s1_vv": (("y", "x"), np.full((2, 2), 0.1, "float32")),
    ...                  "s1_vh": (("y", "x"), np.full((2, 2), 0.01, "float32"))})
    >>> arrays, has_time = prepare_inputs(ds)
    >>> list(arrays), has_time
    (['s1'], False)
    """
    has_time = "time" in ds.dims
    already = [m.key for m in sensors.MODALITIES.values() if m.key in ds.data_vars and m.band_dim in ds[m.key].dims]
    present = already or prepare.detect_modalities(ds)
    if modalities is not None:
        unknown = [m for m in modalities if m not in sensors.MODALITIES]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; choose from {list(sensors.MODALITIES)}")
        missing = [m for m in modalities if m not in present]
        if missing:
            raise ValueError(f"modalities {missing} requested but not in the Dataset (it has "
                             f"{present}); drop them from modalities= or load them")
    lead = ("time",) if has_time else ()
    found: dict[str, ModalityInput] = {}
    for key in [k for k in present if modalities is None or k in modalities]:
        spec = sensors.MODALITIES[key]
        if already:   # the output of terrafm.prepare.normalize
            data = ds[key].transpose(*lead, spec.band_dim, "y", "x")
            if data.sizes[spec.band_dim] != spec.n_bands:
                raise ValueError(f"{key}: {data.sizes[spec.band_dim]} bands, TerraFM needs {list(spec.bands)}")
            mask = ds[spec.mask_variable] if spec.mask_variable in ds else xr.ones_like(data.isel({spec.band_dim: 0}), bool)
            found[key] = ModalityInput(data, mask.transpose(*lead, "y", "x"))
        else:         # stored bands: normalized block by block as they are read (prepare.normalize_block)
            stack, mask = prepare.stack_bands(ds, key)
            found[key] = ModalityInput(stack, mask.transpose(*lead, "y", "x"), raw=True)
    if not found:
        raise prepare.no_modality_error(ds)
    return found, has_time


# ---------------------------------------------------------------------- model
def _build_model(model: Any, weights: str | os.PathLike | None):
    import torch

    from .model import create_model

    if isinstance(model, torch.nn.Module):
        return model.eval()
    if not isinstance(model, str):
        raise TypeError(f"model must be a registered name (terrafm.list_models()) or an nn.Module, got {type(model).__name__}")
    if weights in ("random", None):
        logger.warning("embedding with an UNTRAINED model %s (weights=%r): the vectors are not meaningful", model, weights)
        return create_model(model).eval()
    return create_model(model, weights=weights).eval()


# ---------------------------------------------------------------------- zarr
SAMPLE_WINDOW = 32
"""Side in pixels of the windows whose values fingerprint an input without STAC provenance."""


def _weights_digest(model) -> str:
    """The checkpoint file's sha256, or a hash of the state dict (weights=None, a model object)."""
    sha = getattr(model, "checkpoint_sha256", None)
    if sha:
        return f"file-sha256:{sha}"
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return f"state-dict-sha256:{digest.hexdigest()}"


def _input_digest(ds: xr.Dataset, arrays: dict[str, ModalityInput], has_time: bool) -> str:
    """What the input's values are: the STAC items ``terrafm.stac.load`` recorded, else the
    Dataset's coordinates and a deterministic sample of the values the model reads."""
    import hashlib

    recorded = ds.attrs.get("terrafm_items_sha256")
    if isinstance(recorded, str) and recorded:
        return f"stac-items-sha256:{recorded}"
    digest = hashlib.sha256()

    def update(name: str, values: Any) -> None:
        values = np.ascontiguousarray(np.asarray(values))
        if values.dtype.kind in "OUS":
            values = np.asarray([str(v) for v in values.ravel()])
            digest.update(f"{name}:{values.dtype}:{values.shape};{'|'.join(values)}".encode())
            return
        digest.update(f"{name}:{values.dtype}:{values.shape};".encode())
        digest.update(values.view(np.uint8).ravel())

    for name in sorted(map(str, ds.coords)):
        coord = ds.coords[name]
        if coord.chunks is None and coord.size <= 1_000_000:
            update(name, coord.values)
    height, width = ds.sizes["y"], ds.sizes["x"]
    half = SAMPLE_WINDOW // 2
    corners = sorted({(max(0, min(height - SAMPLE_WINDOW, cy - half)), max(0, min(width - SAMPLE_WINDOW, cx - half)))
                      for cy, cx in ((height // 2, width // 2), (height // 4, width // 4))})
    n_times = ds.sizes["time"] if has_time else 1
    times = sorted({0, n_times // 2, n_times - 1})
    names, windows = [], []
    for key in sorted(arrays):
        for part, array in zip(("data", "mask"), arrays[key][:2]):
            for t in times:
                for y0, x0 in corners:
                    window = {"y": slice(y0, y0 + SAMPLE_WINDOW), "x": slice(x0, x0 + SAMPLE_WINDOW)}
                    if has_time and "time" in array.dims:
                        window["time"] = t
                    names.append(f"{key}.{part}[t={t},y={y0},x={x0}]")
                    windows.append(array.isel(window).data)
    import dask

    for name, values in zip(names, dask.compute(*windows)):
        update(name, values)
    return f"sample-sha256:{digest.hexdigest()}"


def _precision_used(device: Any, precision: str) -> str:
    from .model import autocast_dtype, resolve_device

    dtype = autocast_dtype(resolve_device(device), precision)
    return "fp32" if dtype is None else str(dtype).replace("torch.bfloat16", "bf16").replace("torch.float16", "fp16")


def _fingerprint(model, grid, level, keys, has_time, times, *, block_chips: int, precision: str,
                 input_digest: str, compiled: bool = False) -> dict:
    """Everything that changes a store's values or layout (a resume must match every field).
    ``compile`` is recorded only when on: compiled kernels may round differently."""
    gbox = grid.geobox
    return {**({"compile": True} if compiled else {}),  # see _RECORDED_WHEN_ON
        "model": getattr(getattr(model, "config", None), "name", type(model).__name__),
        "weights": _weights_digest(model),
        "fusion": getattr(model, "fusion_mode", None),
        "embed_dim": int(model.embed_dim),
        "level": level, "chip_size": grid.chip_size, "overlap": grid.margin, "block_chips": int(block_chips),
        "precision": precision,
        "modalities": list(keys),
        "input": input_digest,
        "crs": str(gbox.crs), "transform": [float(v) for v in tuple(gbox.affine)[:6]],
        "shape": [int(v) for v in gbox.shape],
        "time": [str(t) for t in times] if has_time else None,
    }


_HOW_TO_MATCH = {
    "model": "the store's model ({old})",
    "weights": "the store's weights (the same checkpoint file, or the same model object)",
    "fusion": "a model whose fusion_mode is {old}",
    "embed_dim": "a model of width {old}",
    "level": "level={old}",
    "chip_size": "chip_size={old}",
    "overlap": "overlap={old}",
    "block_chips": "block_chips={old} (the store's blocks; batch_size lowers memory too)",
    "precision": "precision={old}",
    "compile": "compile={old}",
    "modalities": "modalities={old}",
    "input": "the same input data (the same STAC items or Dataset values)",
    "crs": "the same area (the store's grid)",
    "transform": "the same area (the store's grid)",
    "shape": "the same area (the store's grid)",
    "time": "the same dates",
}


def _shown(value: Any) -> str:
    text = repr(value)
    if isinstance(value, str) and ":" in value and len(value) > 40:   # a digest: its kind and first hex digits
        kind, _, hexdigits = value.partition(":")
        text = repr(f"{kind}:{hexdigits[:16]}...")
    return text if len(text) <= 120 else text[:117] + "..."


_RECORDED_WHEN_ON = {"compile": False}
"""Fingerprint fields a store records only when they differ from this value (older stores resume)."""


def _mismatch_error(out: Path, old: dict, new: dict) -> ValueError:
    old, new = {**_RECORDED_WHEN_ON, **old}, {**_RECORDED_WHEN_ON, **new}
    fields = [k for k in new if old.get(k) != new.get(k)]
    details = "; ".join(
        f"{k}: the store has {_shown(old[k])}, this run {_shown(new[k])}" if k in old
        else f"{k}: the store does not record it (written by an older terrafm), this run {_shown(new[k])}"
        for k in fields)
    fixes = []
    for k in fields:
        fix = _HOW_TO_MATCH.get(k, "{old}").format(old=_shown(old.get(k)))
        if fix not in fixes:
            fixes.append(fix)
    return ValueError(
        f"{out} holds embeddings of another run ({details}); refusing to mix them. To resume it, run with "
        f"{'; '.join(fixes)}. Or pass overwrite=True to recompute the whole store (the old one is replaced only "
        "once the new one is complete), or choose another out= path.")


def _stored_run(path: Path) -> dict | None:
    """The fingerprint of a terrafm embedding store at ``path``; None if it is not one."""
    import zarr

    if not path.is_dir():
        return None
    try:
        run = zarr.open_group(str(path), mode="r").attrs.get("terrafm_run")
        return json.loads(run) if isinstance(run, str) else None
    except Exception:
        return None


def _check_out(out: str | os.PathLike, overwrite: bool, ds: xr.Dataset) -> Path:
    """Before any compute: ``out`` is writable, is not what ``ds`` reads, and an existing
    ``out`` is a terrafm embedding store (resumed) or may be replaced (``overwrite=True``)."""
    target = Path(out).expanduser().resolve()
    resumable = target.exists() and _stored_run(target) is not None
    try:
        check_output_path(out, overwrite=overwrite or resumable, reads=sources_of(ds), what="input Dataset")
    except FileExistsError:
        raise FileExistsError(f"{out} exists and is not a terrafm embedding store (terrafm.embed resumes only "
                              "its own stores): choose another out= path, or pass overwrite=True to replace it"
                              ) from None
    return target


def _create_store(path: Path, template: xr.Dataset) -> None:
    """Write the store's metadata into a temporary sibling and rename it to ``path``: a store at
    ``path`` always has its complete layout."""
    tmp = temporary_sibling(path, "creating")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_zarr(template, tmp, compute=False, consolidated=False, mode="w-")
        os.rename(tmp, path)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _store_to_write(target: Path, fp: dict, template, overwrite: bool, resume: bool) -> Path:
    """Where this run writes its blocks: ``target`` itself (new or resumed), or with
    ``overwrite=True`` over an existing path a resumable partial sibling renamed onto ``target``
    when complete."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        _create_store(target, template())
        return target
    if not overwrite:
        old = _stored_run(target)
        if old != fp:
            raise _mismatch_error(target, old or {}, fp)
        return target
    partial = target.with_name(f".{target.name}.partial")
    if partial.exists() and (not resume or _stored_run(partial) != fp):
        import shutil

        logger.info("removing %s (an unfinished overwrite of %s with other settings)", partial, target)
        shutil.rmtree(partial)
    if partial.exists():
        logger.info("resuming the overwrite of %s in %s", target, partial)
    else:
        _create_store(partial, template())
    return partial


def _template(coords_y, coords_x, times, has_time, d, blocks_shape, keys, chunks, crs_coord) -> xr.Dataset:
    import dask.array as da

    lead = (len(times),) if has_time else ()
    ldims = ("time",) if has_time else ()
    lchunk = (1,) if has_time else ()
    shape = lead + (len(coords_y), len(coords_x))
    coords = {"y": coords_y, "x": coords_x}
    if has_time:
        coords["time"] = times
    ds = xr.Dataset(coords=coords)
    ds[EMBEDDING_VAR] = (ldims + ("y", "x", "embedding"),
                     da.full(shape + (d,), np.nan, dtype="float32", chunks=lchunk + chunks + (d,)))
    ds["valid"] = (ldims + ("y", "x"), da.zeros(shape, dtype=bool, chunks=lchunk + chunks))
    for k in keys:
        ds[f"valid_{k}"] = (ldims + ("y", "x"), da.zeros(shape, dtype=bool, chunks=lchunk + chunks))
    ds["blocks_done"] = (ldims + ("block_y", "block_x"),
                         da.zeros(lead + blocks_shape, dtype="int8", chunks=lchunk + (1, 1)))
    ds = ds.assign_coords(spatial_ref=crs_coord)
    for name in ds.data_vars:
        ds[name].encoding["chunks"] = ds[name].data.chunksize
    return ds


# ---------------------------------------------------------------------- distributed
_WORKER_MODELS: dict[str, Any] = {}
_WORKER_DEVICES: dict[str, str] = {}   # model key -> the device this worker ran it on


def _device_name(device: Any) -> str:
    """``"cuda:1"`` for 1, ``"1"``, ``"cuda:1"``; no check that this process has the device
    (the workers may have GPUs the client has not)."""
    from .model.device import parse_device

    try:
        return str(parse_device(device))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"device list entry {device!r}: each entry is one device, e.g. 'cuda:0', 'cuda:1' "
                         f"or 0, 1 ({exc})") from None


def _wants_any_gpu(device: Any) -> bool:
    """``"auto"``/``"cuda"`` (a torch device too): the worker's GPU is ours to choose."""
    return device is None or (not isinstance(device, (list, tuple)) and str(device) in ("auto", "cuda"))


def worker_devices(workers: Sequence[str], device: Any = "auto",
                   visibility: dict[str, tuple[int, str | None]] | None = None) -> dict[str, Any]:
    """The device each dask worker runs the model on: one GPU per worker.

    Workers are taken in sorted address order. An explicit list (``["cuda:0", "cuda:1"]``)
    gives the i-th worker entry ``i % len(list)``. ``"auto"``/``"cuda"`` spread the workers of
    one host that see the same GPUs in the same order (``visibility``: address -> (CUDA devices
    the worker sees, its ``CUDA_VISIBLE_DEVICES``)) over those GPUs, ``cuda:0``, ``cuda:1``, ...;
    a worker with a ``CUDA_VISIBLE_DEVICES`` of its own (one GPU, or dask-cuda's rotated list
    whose first GPU is the worker's) takes ``cuda:0``; a worker without CUDA keeps ``device``
    (``"auto"``: MPS or CPU). Any other device (``"cpu"``, ``"cuda:1"``) is used by every worker.

    Examples
    --------
    >>> worker_devices(["tcp://h:2", "tcp://h:1"], ["cuda:0", "cuda:1"])
    {'tcp://h:1': 'cuda:0', 'tcp://h:2': 'cuda:1'}
    >>> worker_devices(["tcp://h:1", "tcp://h:2"], "auto", {"tcp://h:1": (2, None), "tcp://h:2": (2, None)})
    {'tcp://h:1': 'cuda:0', 'tcp://h:2': 'cuda:1'}
    >>> worker_devices(["tcp://h:1", "tcp://h:2"], "auto", {"tcp://h:1": (2, "0,1"), "tcp://h:2": (2, "1,0")})
    {'tcp://h:1': 'cuda:0', 'tcp://h:2': 'cuda:0'}
    """
    from distributed.comm import get_address_host

    addresses = sorted(workers)
    if isinstance(device, (list, tuple)):
        if not device:
            raise ValueError("device=[] lists no device; pass one per worker, e.g. ['cuda:0', 'cuda:1']")
        names = [_device_name(d) for d in device]
        if len({n.split(":")[0] for n in names}) > 1:
            raise ValueError(f"device={list(device)!r} mixes device types; the workers must compute alike "
                             "(one precision, one store), so list devices of one type")
        if len(addresses) > len(names):
            logger.warning("%d dask workers for %d devices %s: devices are shared", len(addresses), len(names), names)
        return {a: names[i % len(names)] for i, a in enumerate(addresses)}
    if not _wants_any_gpu(device) or visibility is None:
        return {a: device for a in addresses}
    groups: dict[tuple[str, str | None], list[str]] = {}
    for a in addresses:
        groups.setdefault((get_address_host(a), visibility[a][1]), []).append(a)
    chosen: dict[str, Any] = {}
    for (host, _), members in groups.items():
        count = visibility[members[0]][0]
        if count and len(members) > count:
            logger.warning("%d dask workers on %s see the same %d GPUs: GPUs are shared", len(members), host, count)
        for j, a in enumerate(members):
            chosen[a] = f"cuda:{j % count}" if count else device
    return {a: chosen[a] for a in addresses}


def _cuda_visibility() -> tuple[int, str | None]:
    import torch

    return (torch.cuda.device_count() if torch.cuda.is_available() else 0), os.environ.get("CUDA_VISIBLE_DEVICES")


def _worker_precision(devices: dict[str, Any], precision: str, dask_worker=None) -> str:
    return _precision_used(devices[dask_worker.address], precision)


class _WorkerDevices:
    """The device of each worker, looked up where a block runs: by name (kept by a worker that
    its nanny restarted), then address; a worker that joined later takes ``fallback`` (one entry
    of a device list, chosen by its name)."""

    def __init__(self, by_address: dict[str, Any], names: dict[str, Any], fallback: Any) -> None:
        self.by_address = by_address
        self.by_name = {names[a]: d for a, d in by_address.items() if a in names}
        self.fallback = fallback

    def here(self) -> Any:
        from distributed import get_worker

        worker = get_worker()
        if worker.address in self.by_address:
            return self.by_address[worker.address]
        if worker.name in self.by_name:
            return self.by_name[worker.name]
        if isinstance(self.fallback, (list, tuple)):
            import zlib

            device = self.fallback[zlib.crc32(str(worker.name).encode()) % len(self.fallback)]
        else:
            device = self.fallback
        logger.warning("dask worker %s (%s) joined after the devices were chosen: it uses %s",
                       worker.name, worker.address, device)
        return device


class _Placement(NamedTuple):
    devices: _WorkerDevices
    resources: dict | None      # what each block asks of a worker (GPU workers advertise GPU=1)
    precision: str              # resolved on the workers: one for the whole store


def _place_blocks(client, device: Any, precision: str) -> _Placement:
    """Devices of the workers, the resources a block asks for, and the precision they all run in."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    gpu_workers = [a for a, w in info.items() if (w.get("resources") or {}).get("GPU", 0) > 0]
    resources = {"GPU": 1} if gpu_workers else None
    workers = gpu_workers or list(info)
    if not workers:
        raise ValueError("the dask cluster has no workers: start some first (cluster.scale(n), "
                         "cluster.adapt(minimum=1) or client.wait_for_workers(n)), then call embed(client=...)")
    visibility = client.run(_cuda_visibility, workers=workers) if _wants_any_gpu(device) else None
    by_address = worker_devices(workers, device, visibility)
    logger.info("dask workers -> devices: %s%s", by_address,
                " (each block asks for resources={'GPU': 1})" if resources else "")
    # every worker resolves its device now: a device it lacks fails here, before any block
    precisions = client.run(_worker_precision, by_address, precision, workers=workers)
    if len(set(precisions.values())) > 1:
        raise ValueError(f"the workers would compute in different precisions {precisions}; one store needs one: "
                         "pass precision='fp16' (or 'fp32')")
    fallback = [_device_name(d) for d in device] if isinstance(device, (list, tuple)) else device
    names = {a: w.get("name") for a, w in info.items()}
    return _Placement(_WorkerDevices(by_address, names, fallback), resources, next(iter(precisions.values())))


class _ModelParcel:
    """Takes the model to the workers by pickle: dask's own serializer of torch modules puts their
    attributes in a msgpack header, which cannot hold the model's caches keyed by torch.device."""

    def __init__(self, model) -> None:
        self.model = model


def _block_task(model_key, parcel, arrays, grid, level, block, block_chips, batch_size,
                device, precision, out, t_index, keys):
    from .engine import Engine

    if isinstance(device, _WorkerDevices):
        device = device.here()
    if model_key not in _WORKER_MODELS:
        _WORKER_MODELS[model_key] = parcel.model.eval()
    engine = Engine(_WORKER_MODELS[model_key], device=device, batch_size=batch_size,
                    precision=precision, prefetch=1, scheduler="synchronous")
    _WORKER_DEVICES[model_key] = str(engine.device)
    (result,) = list(engine.run(arrays, grid, level, block_chips, blocks=[block]))
    if out is not None:
        _write_block(out, result, t_index, keys)
        return None
    return result


def _write_block(out, result, t_index, keys) -> None:
    import zarr

    group = zarr.open_group(str(out), mode="r+")
    b = result.block
    lead = (t_index,) if t_index is not None else ()
    group[EMBEDDING_VAR][lead + (b.out_y, b.out_x, slice(None))] = result.embedding
    group["valid"][lead + (b.out_y, b.out_x)] = result.valid
    for k in keys:
        group[f"valid_{k}"][lead + (b.out_y, b.out_x)] = result.modality_valid[k]
    group["blocks_done"][lead + (b.by, b.bx)] = 1  # written last: marks the block complete


# ---------------------------------------------------------------------- public
def embed(ds: xr.Dataset | xr.DataArray, model: Any = "terrafm_base", weights: str | os.PathLike | None = "hf",
          level: str = "patch", chip_size: int = 224, overlap: int | None = None,
          batch_size: int = 16, device: Any = "auto", modalities: Sequence[str] | None = None,
          out: str | os.PathLike | None = None, resume: bool = True, progress: bool = True,
          precision: str = "auto", block_chips: int = 4, client: Any = None,
          overwrite: bool = False, compile: bool = False) -> xr.DataArray:
    """Embed a Sentinel-1/2 Dataset with TerraFM into a georeferenced DataArray.

    Parameters
    ----------
    ds : xr.Dataset
        From ``terrafm.stac.load`` / ``terrafm.prepare.normalize`` (dims ([time,] y, x), CRS).
    model : str or torch.nn.Module
        Registered name (``"terrafm_base"``) or an already-built TerraFM module.
    weights : "hf", path, "random" or None
        Checkpoint for a named model; ``"random"`` runs untrained (tests, demos).
    level : {"patch", "chip"}
        ``"patch"``: one vector per 16-px patch on the 160 m grid derived from the input GeoBox;
        ``"chip"``: one CLS vector per ``chip_size`` chip on the chip grid.
    chip_size : int
        Chip side in pixels, a multiple of 16.
    overlap : int, "fast" or None
        Pixels of each chip's border discarded before stitching (a multiple of 16). None:
        :func:`terrafm.tiling.default_margin`, 16 px (one patch) for chips of 64 px and more;
        ``"fast"``: 0, no overlap (on 224 px chips 1.36x fewer chips than the default, seams
        more visible). The trade-off is measured in benchmarks/README.md. Ignored for
        ``level="chip"`` (chips tile without overlap).
    batch_size, device, precision
        Chips per forward pass; ``"auto"``/``"cpu"``/``"cuda"``/``"cuda:1"``/a CUDA index, or
        with ``client=`` a list of devices for the workers; autocast choice.
    modalities : list of str, optional
        Restrict to these modality keys (default: all present).
    out : path, optional
        A zarr store written block by block; rerunning resumes (skips finished blocks). A store
        whose fingerprint differs in anything that changes its values or layout (model weights,
        input data, precision, chip size, overlap, block_chips, modalities, fusion, level, area,
        dates) is refused, naming the field. ``out`` is checked before any compute: writable, not
        the store the input is read from, and not an existing path other than a terrafm store.
    resume : bool
        False recomputes every block of a matching store.
    overwrite : bool
        Replace what is at ``out`` (a refused store, a file or another zarr store; never a directory
        that is not a store): the new store is built next to it (``.<name>.partial``, resumable by
        rerunning with ``overwrite=True``) and renamed onto ``out`` once complete.
    progress : bool
        Show a tqdm bar.
    block_chips : int
        Chips per block side (unit of reading, writing and resuming; part of a store's layout).
    client : distributed.Client, optional
        Run blocks on a dask cluster, one model and one device per worker (see the module
        docstring and README "Scaling out").
    compile : bool
        ``torch.compile`` the model once for this call (this process; not with ``client=``). Pays
        on GPUs for large areas; on a CPU it costs more than it saves (benchmarks/README.md).
        Compiled kernels may round differently, so a store records it.

    Returns
    -------
    xr.DataArray named ``"embedding"``, dims ([time,] y, x, embedding), float32 with NaN where no
    modality was valid, coordinates ``valid``, ``valid_<modality>``, ``spatial_ref``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, rioxarray  # doctest: +SKIP
    >>> emb = embed(ds, model="terrafm_tiny", weights="random", chip_size=64, device="cpu")  # doctest: +SKIP
    >>> emb.dims  # doctest: +SKIP
    ('time', 'y', 'x', 'embedding')
    """
    from odc.geo.xr import xr_coords

    from . import __version__
    from .engine import Engine, plan_blocks
    from .tiling import ChipGrid, resolve_margin

    if isinstance(ds, xr.DataArray):
        ds = ds.to_dataset(name=ds.name or "data") if ds.name in sensors.MODALITIES else ds.to_dataset(dim="band")
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds must be an xarray Dataset, got {type(ds).__name__}")
    from .validate import check_dataset   # grid (south-up rows flipped), values, model: before any compute
    ds = check_dataset(ds, modalities, model=model)
    if level not in ("patch", "chip"):
        raise ValueError(f"level={level!r}; use 'patch' (160 m grid) or 'chip' (one vector per chip)")
    gbox = _geobox(ds)
    if level == "chip":
        margin = 0
    else:
        margin = resolve_margin(chip_size, overlap)
    grid = ChipGrid(gbox, int(chip_size), margin)
    if gbox.shape[0] < chip_size or gbox.shape[1] < chip_size:
        raise ValueError(f"the area is {gbox.shape[0]}x{gbox.shape[1]} px, smaller than one "
                         f"{chip_size} px chip; use a larger bbox or a smaller chip_size "
                         f"(multiple of 16, e.g. {max(16, min(gbox.shape) // 16 * 16)})")
    if isinstance(block_chips, bool) or not isinstance(block_chips, (int, np.integer)) or block_chips < 1:
        raise ValueError(f"block_chips={block_chips!r} must be a positive integer (chips per block side), e.g. 4")
    arrays, has_time = prepare_inputs(ds, modalities)
    if compile and client is not None:
        raise ValueError("compile=True compiles the model in this process; it is not available with client= "
                         "(the workers run the model as it is): drop compile or client")
    target = _check_out(out, overwrite, ds) if out is not None else None
    if isinstance(device, (list, tuple)) and client is None:
        raise ValueError(f"device={list(device)!r} lists one device per dask worker; pass client= too, "
                         "or one device for this process (e.g. device='cuda:1')")
    # devices and precision of the workers, checked on them before the model is built
    placement = _place_blocks(client, device, precision) if client is not None else None
    keys = list(arrays)
    times = ds["time"].values if has_time else None
    net = _build_model(model, weights)
    was_folded = getattr(net, "folded", False)   # the engine folds the stems; a caller's model is given back as it came

    out_gbox = gbox.zoom_out(PATCH_SIZE) if level == "patch" else gbox.zoom_out(chip_size)
    if level == "chip":
        out_gbox = type(gbox)(grid.n_chips, out_gbox.affine, out_gbox.crs)
    coords = xr_coords(out_gbox, crs_coord_name="spatial_ref")
    blocks = plan_blocks(grid, level, block_chips)
    blocks_shape = (max(b.by for b in blocks) + 1, max(b.bx for b in blocks) + 1)
    d = int(net.embed_dim)
    n_t = len(times) if has_time else 1
    steps = [(t, b) for t in range(n_t) for b in blocks]

    attrs = {"model": getattr(getattr(net, "config", None), "name", type(net).__name__),
             "checkpoint_sha256": getattr(net, "checkpoint_sha256", None) or "",
             "fusion": getattr(net, "fusion_mode", None) or "",
             "modalities": keys, "normalization": NORMALIZATION, "terrafm_version": __version__,
             "level": level, "chip_size": int(chip_size), "overlap": int(margin),
             "input_items": list(ds.attrs.get("terrafm_items") or [])}
    store_done = None
    write_to = None
    if target is not None:
        fp = _fingerprint(net, grid, level, keys, has_time, times, block_chips=block_chips,
                          precision=placement.precision if placement else _precision_used(device, precision),
                          input_digest=_input_digest(ds, arrays, has_time), compiled=bool(compile))
        chunks = (blocks[0].out_y.stop - blocks[0].out_y.start, blocks[0].out_x.stop - blocks[0].out_x.start)

        def template() -> xr.Dataset:
            tmpl = _template(coords["y"].values, coords["x"].values, times, has_time, d, blocks_shape,
                             keys, chunks, coords["spatial_ref"])
            tmpl.attrs["terrafm_run"] = json.dumps(fp)
            tmpl[EMBEDDING_VAR].attrs = serialisable_attrs(attrs)
            return tmpl

        write_to = _store_to_write(target, fp, template, overwrite, resume)
        import zarr

        done_arr = np.asarray(zarr.open_group(str(write_to), mode="r")["blocks_done"][...])
        store_done = done_arr.reshape((n_t,) + blocks_shape)
        if resume:
            steps = [(t, b) for t, b in steps if not store_done[t, b.by, b.bx]]
        logger.info("%s: %d of %d blocks to compute", write_to, len(steps), n_t * len(blocks))
    else:
        emb = np.full(((n_t,) + out_gbox.shape.yx + (d,)), np.nan, "float32")
        valid = np.zeros((n_t,) + out_gbox.shape.yx, bool)
        mvalid = {k: np.zeros((n_t,) + out_gbox.shape.yx, bool) for k in keys}

    def arrays_at(t):
        if not has_time:
            return arrays
        return {k: ModalityInput(*(v.isel(time=t) if isinstance(v, xr.DataArray) and "time" in v.dims else v
                                   for v in source)) for k, source in arrays.items()}

    def collect(t, result):
        if write_to is not None:
            _write_block(write_to, result, t if has_time else None, keys)
            return
        b = result.block
        emb[t, b.out_y, b.out_x] = result.embedding
        valid[t, b.out_y, b.out_x] = result.valid
        for k in keys:
            mvalid[k][t, b.out_y, b.out_x] = result.modality_valid[k]

    from tqdm.auto import tqdm

    total = sum(b.n_chips for _, b in steps)
    bar = tqdm(total=total, unit="chip", desc="terrafm.embed", disable=not progress)
    try:
        if client is not None:
            model_ref = client.scatter(_ModelParcel(net.cpu()), broadcast=True)
            model_key = uuid.uuid4().hex
            futures = [client.submit(_block_task, model_key, model_ref, arrays_at(t), grid, level, b,
                                     block_chips, batch_size, placement.devices, placement.precision,
                                     str(write_to) if write_to is not None else None, t if has_time else None,
                                     keys, resources=placement.resources, pure=False) for t, b in steps]
            from distributed import as_completed

            index = {f.key: s for f, s in zip(futures, steps)}
            for fut in as_completed(futures):
                res = fut.result()
                t, b = index[fut.key]
                if res is not None:
                    collect(t, res)
                bar.update(b.n_chips)
        else:
            engine = Engine(net, device=device, batch_size=batch_size, precision=precision, compile=compile)
            for t in range(n_t):
                todo = [b for tt, b in steps if tt == t]
                if todo:
                    for result in engine.run(arrays_at(t), grid, level, block_chips, blocks=todo, progress=bar):
                        collect(t, result)
    finally:
        bar.close()
        if hasattr(net, "fold_for_inference"):
            net.fold_for_inference(was_folded)

    if write_to is not None:
        if write_to != target:
            replace_with(write_to, target)
            logger.info("%s replaced by the recomputed store", target)
        result = open_embedding(target)
        from .store import write_stac_item

        write_stac_item(target)   # <out>/stac-item.json: the finished store, for catalogs
    else:
        lead = ("time",) if has_time else ()
        sq = (lambda a: a) if has_time else (lambda a: a[0])
        result = xr.DataArray(sq(emb), dims=lead + ("y", "x", "embedding"), name="embedding",
                              coords={"y": coords["y"], "x": coords["x"], **({"time": times} if has_time else {})})
        result = result.assign_coords(valid=(lead + ("y", "x"), sq(valid)),
                                      **{f"valid_{k}": (lead + ("y", "x"), sq(mvalid[k])) for k in keys})
    result = result.assign_coords(spatial_ref=coords["spatial_ref"])
    result.attrs = attrs
    result.name = "embedding"
    return result


class _CallableModule(type(json)):
    """``terrafm.embed`` is both this module and the function: importing the submodule (as
    ``from terrafm.embed import embed`` does) rebinds the package attribute to the module, so
    the module forwards calls to :func:`embed`."""

    def __call__(self, *args, **kwargs) -> xr.DataArray:
        return embed(*args, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
