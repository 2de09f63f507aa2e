"""Inference engine: read chips from (dask-backed) arrays in a background thread, batch them
through the model, crop interiors and stitch them into blocks.

Work is organised in *blocks* of ``block_chips x block_chips`` chips. A block is read from the
input in one window (its chips overlap), cut into chips, and run through the model in fixed
batches that never mix blocks, so a block's result does not depend on which other blocks ran:
a rerun (resume) or another process (dask worker) reproduces it bit for bit. A bounded queue of
``prefetch`` blocks sits between the reader thread and the model, so at most a few blocks of
input are in memory at any time.

Examples
--------
>>> import numpy as np, xarray as xr
>>> from odc.geo.geobox import GeoBox
>>> from terrafm.model import create_model
>>> from terrafm.tiling import ChipGrid
>>> gbox = GeoBox.from_bbox((0, 0, 640, 640), "EPSG:32631", resolution=10)
>>> x = xr.DataArray(np.full((2, 64, 64), 0.5, "float32"), dims=("band_s1", "y", "x"))
>>> m = xr.DataArray(np.ones((64, 64), bool), dims=("y", "x"))
>>> eng = Engine(create_model("terrafm_tiny").eval(), device="cpu", batch_size=4)
>>> res = list(eng.run({"s1": (x, m)}, ChipGrid(gbox, 32, 0), level="patch", block_chips=1))
>>> len(res), res[0].embedding.shape
(4, (2, 2, 64))
"""

from __future__ import annotations

import inspect

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np

from .prepare import FILL_VALUE, normalize_block, normalized_block
from .sensors import PATCH_SIZE, patch_valid
from .tiling import Chip, ChipGrid

__all__ = ["Engine", "Block", "BlockResult", "ModalityInput", "plan_blocks"]

logger = logging.getLogger(__name__)


class ModalityInput(NamedTuple):
    """What the engine reads for one modality (a plain ``(data, mask)`` tuple also works).

    ``data`` is ``(C, y, x)`` (numpy, dask or xarray); ``mask`` ``(y, x)`` bool. With ``raw=True``
    ``data`` holds stored values (S2 DN, S1 linear power) and each block is normalized and masked
    by :func:`terrafm.prepare.normalize_block` right after it is read (one pass, no full-area
    intermediates); ``offset`` is the S2 DN offset to subtract then. Otherwise ``data`` is
    already normalized.
    """

    data: Any
    mask: Any
    raw: bool = False
    offset: Any = None


@dataclass(frozen=True)
class Block:
    """A rectangle of chips and the output cells (patches or chips) it fills.

    Examples
    --------
    >>> Block(0, 0, range(0, 2), range(0, 2), slice(0, 16), slice(0, 16)).n_chips
    4
    """

    by: int
    bx: int
    rows: range
    cols: range
    out_y: slice
    out_x: slice

    @property
    def n_chips(self) -> int:
        return len(self.rows) * len(self.cols)


@dataclass
class BlockResult:
    """Stitched output of one block: ``embedding`` (h, w, D) float32 with NaN where invalid,
    ``valid`` (h, w) and ``modality_valid`` key -> (h, w) bool."""

    block: Block
    embedding: np.ndarray
    valid: np.ndarray
    modality_valid: dict[str, np.ndarray]


def plan_blocks(grid: ChipGrid, level: str, block_chips: int) -> list[Block]:
    """Split the chip grid into blocks of ``block_chips x block_chips`` chips.

    Examples
    --------
    >>> from odc.geo.geobox import GeoBox
    >>> gbox = GeoBox.from_bbox((0, 0, 3200, 3200), "EPSG:32631", resolution=10)
    >>> [b.out_y for b in plan_blocks(ChipGrid(gbox, 96, 16), "patch", 2)][:2]
    [slice(0, 8, None), slice(0, 8, None)]
    """
    ny, nx = grid.n_chips
    blocks = []
    for by, r0 in enumerate(range(0, ny, block_chips)):
        rows = range(r0, min(ny, r0 + block_chips))
        for bx, c0 in enumerate(range(0, nx, block_chips)):
            cols = range(c0, min(nx, c0 + block_chips))
            if level == "chip":
                oy, ox = slice(rows.start, rows.stop), slice(cols.start, cols.stop)
            else:
                first, last_r, last_c = grid.chip(r0, c0), grid.chip(rows[-1], 0), grid.chip(0, cols[-1])
                oy = slice(first.py0, last_r.py0 + last_r.ph)
                ox = slice(first.px0, last_c.px0 + last_c.pw)
            blocks.append(Block(by, bx, rows, cols, oy, ox))
    return blocks


def _read_windows(arrays: list, y0: int, x0: int, h: int, w: int, fills: list, scheduler: str | None,
                  ) -> list[np.ndarray]:
    """Read ``a[..., y0:y0+h, x0:x0+w]`` of each array (may lie partly outside), padding with
    ``fills``; lazy arrays are computed together so they share their reads."""
    H, W = arrays[0].shape[-2:]
    ys, ye, xs, xe = max(0, y0), min(H, y0 + h), max(0, x0), min(W, x0 + w)
    windows = [a[..., ys:ye, xs:xe] for a in arrays]
    parts = [getattr(window, "data", window) for window in windows]
    lazy = [i for i, p in enumerate(parts) if hasattr(p, "compute")]
    if lazy:
        import dask

        computed = dask.compute(*[parts[i] for i in lazy], scheduler=scheduler)
        for i, value in zip(lazy, computed):
            parts[i] = value
    out = []
    for part, fill in zip(parts, fills):
        data = np.asarray(part)
        pad = [(0, 0)] * (data.ndim - 2) + [(ys - y0, y0 + h - ye), (xs - x0, x0 + w - xe)]
        if any(p != (0, 0) for p in pad):
            data = np.pad(data, pad, constant_values=fill)
        out.append(data)
    return out


class Engine:
    """Runs a TerraFM model over chip blocks.

    Parameters
    ----------
    model : torch.nn.Module
        A TerraFM model (``terrafm.model`` contract), in eval mode.
    device : str or torch.device
        ``"auto"``, ``"cpu"``, ``"cuda"``…; the model is moved there.
    batch_size : int
        Chips per forward pass (batches never straddle blocks).
    precision : str
        ``"auto"`` (bf16/fp16 autocast on GPU; bf16 on a CPU with native bf16, else fp32: see
        :func:`terrafm.model.autocast_dtype`), ``"fp32"`` (bit-exact), ``"bf16"``, ``"fp16"``.
    prefetch : int
        Blocks read ahead by the background thread (bounded queue). One is enough when reading a
        block is faster than running the model on it (the usual case); more only costs memory.
    scheduler : str, optional
        dask scheduler used for reading (None: dask's default).
    compile : bool
        Run the model through ``torch.compile`` (compiled once per Engine, on the first batch of
        each new shape). Pays on GPUs; on a CPU the compile costs minutes and the forward gains
        little (see benchmarks/README.md). Compiled kernels may round differently from eager ones.

    On a GPU, a block's outputs are gathered into device buffers batch by batch, copied
    non-blocking into pinned host buffers, and the host waits once per block (:meth:`_sync`),
    so reading, host-to-device copies and compute overlap; inputs are pinned by the reader
    thread and copied non-blocking. On a CPU the same code runs without copies or pinning.

    Examples
    --------
    >>> from terrafm.model import create_model
    >>> Engine(create_model("terrafm_tiny"), device="cpu").device
    device(type='cpu')
    """

    def __init__(self, model, device: Any = "auto", batch_size: int = 16, precision: str = "auto",
                 prefetch: int = 1, scheduler: str | None = None, compile: bool = False) -> None:
        import torch

        from .model import resolve_device

        self.device = resolve_device(device)
        self.model = model.to(self.device).eval().fold_for_inference()
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1, e.g. 16")
        self.precision = precision
        self.prefetch = max(1, int(prefetch))
        self.scheduler = scheduler
        self._pin = self.device.type == "cuda"
        self._torch = torch
        self.compile = bool(compile)
        # compiled once per Engine; the wrapper shares the model's parameters
        self._net = torch.compile(self.model) if self.compile else self.model
        # models that take check_finite (TerraFM) skip their per-batch NaN check, a device sync:
        # the engine checks each block on the host instead; other wrappers are called as they are
        self._forward_options = ({"check_finite": False}
                                 if "check_finite" in inspect.signature(self.model.forward).parameters else {})

    # ------------------------------------------------------------------ reading
    def read_block(self, arrays: Mapping[str, tuple[Any, Any]], grid: ChipGrid, block: Block,
                   ) -> tuple[list[Chip], dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Read one block window per modality and cut it into chips.

        ``arrays``: key -> :class:`ModalityInput` (or a ``(normalized data, mask)`` tuple).
        Returns the chips and, per modality, stacked chips (N, C, s, s) and masks (N, s, s).
        """
        chips = [grid.chip(r, c) for r in block.rows for c in block.cols]
        y0, x0 = chips[0].y0, chips[0].x0
        h = chips[-1].y0 + grid.chip_size - y0
        w = chips[-1].x0 + grid.chip_size - x0
        images, masks = {}, {}
        s = grid.chip_size
        for key, source in arrays.items():
            source = ModalityInput(*source)
            data_fill = 0 if source.raw else FILL_VALUE  # padding is masked invalid either way
            win, mwin = _read_windows([source.data, source.mask], y0, x0, h, w, [data_fill, False],
                                      self.scheduler)
            mwin = mwin.astype(bool, copy=False)
            if source.raw:
                offset = None if source.offset is None else np.asarray(source.offset)
                win, mwin = normalize_block(win, key, mwin, offset)
            else:
                win, mwin = normalized_block(win, mwin)
            images[key] = np.stack([win[:, c.y0 - y0:c.y0 - y0 + s, c.x0 - x0:c.x0 - x0 + s] for c in chips])
            masks[key] = np.stack([mwin[c.y0 - y0:c.y0 - y0 + s, c.x0 - x0:c.x0 - x0 + s] for c in chips])
        return chips, images, masks

    # ------------------------------------------------------------------ model
    def stage(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Block arrays as host tensors ready for a non-blocking copy to the device (pinned on CUDA)."""
        staged = {}
        for key, array in arrays.items():
            tensor = array if isinstance(array, self._torch.Tensor) else self._torch.from_numpy(np.ascontiguousarray(array))
            staged[key] = tensor.pin_memory() if self._pin and not tensor.is_pinned() else tensor
        return staged

    def _sync(self) -> None:
        """Wait for the work queued on the device: called once per block, after its outputs are
        queued for the copy to the host (a no-op on CPU)."""
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            self._torch.mps.synchronize()

    def _to_host(self, buffer):
        """Queue the copy of a device buffer into a pinned host buffer (the CPU buffer itself on CPU)."""
        if self.device.type == "cpu":
            return buffer
        host = self._torch.empty(buffer.shape, dtype=buffer.dtype, pin_memory=self._pin)
        host.copy_(buffer, non_blocking=self._pin)
        return host

    def _run_batches(self, images: Mapping[str, Any], masks: Mapping[str, Any], level: str,
                     inner: tuple[slice, slice]) -> list[np.ndarray]:
        """Every batch of a block through the model; the outputs the block keeps (chip level: CLS
        and whether any patch is valid; patch level: the interiors ``inner``) are gathered into
        per-block device buffers, copied to the host once, with one sync."""
        torch = self._torch
        from .model import autocast
        from .model.terrafm import check_finite_inputs

        n = len(next(iter(images.values())))
        if self._forward_options:
            check_finite_inputs(images)  # on the host tensors, once per block, for the model's skipped check
        buffers: list = []
        with torch.inference_mode(), autocast(self.device, self.precision):
            for start in range(0, n, self.batch_size):
                sl = slice(start, start + self.batch_size)
                out = self._net({k: v[sl].to(self.device, non_blocking=True) for k, v in images.items()},
                                masks={k: v[sl] for k, v in masks.items()}, **self._forward_options)
                if level == "chip":
                    parts = (out.cls, out.valid.flatten(1).any(1))
                else:
                    parts = (out.patch[(slice(None), *inner)], out.valid[(slice(None), *inner)])
                if not buffers:
                    buffers = [torch.empty((n, *p.shape[1:]), dtype=torch.float32 if p.is_floating_point() else torch.bool,
                                           device=self.device) for p in parts]
                for buffer, part in zip(buffers, parts):
                    buffer[sl].copy_(part)
            host = [self._to_host(buffer) for buffer in buffers]
        self._sync()
        return [h.numpy() for h in host]

    def forward(self, images: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]):
        """Run one batch; returns (cls (B, D), patch (B, h, w, D), valid (B, h, w)) as numpy.

        Which modality counts where is the model's decision (its masks, its pixel -> patch rule).
        """
        torch = self._torch
        from .model import autocast

        images, masks = self.stage(images), self.stage(masks)
        with torch.inference_mode(), autocast(self.device, self.precision):
            out = self._net({k: v.to(self.device, non_blocking=True) for k, v in images.items()},
                            masks={k: v.to(self.device, non_blocking=True) for k, v in masks.items()})
        return (out.cls.float().cpu().numpy(), out.patch.float().cpu().numpy(),
                out.valid.cpu().numpy().astype(bool))

    def process(self, grid: ChipGrid, block: Block, level: str, chips: list[Chip],
                images: Mapping[str, Any], masks: Mapping[str, Any]) -> BlockResult:
        """Batch a read block through the model, crop chip interiors and stitch them.

        ``images``/``masks``: key -> (N, C, s, s) / (N, s, s) chips as numpy or as :meth:`stage`
        tensors. An output vector that is not finite (NaN or inf: a model with bad parameters,
        inputs that overflow) is marked invalid like a position without data; their count is
        logged.
        """
        h, w = block.out_y.stop - block.out_y.start, block.out_x.stop - block.out_x.start
        d = self.model.embed_dim
        emb = np.full((h, w, d), np.nan, "float32")
        valid = np.zeros((h, w), bool)
        mvalid = {k: np.zeros((h, w), bool) for k in images}
        m, sp = grid.margin // PATCH_SIZE, grid.stride // PATCH_SIZE
        # per-patch masks by the model's own (torch) rule, on the host: the model takes its mask
        # decisions there, so a GPU forward never waits on a device-to-host read
        patch_masks = {k: patch_valid(v if isinstance(v, self._torch.Tensor) else self._torch.from_numpy(np.asarray(v)),
                                      PATCH_SIZE) for k, v in masks.items()}
        kept, kept_valid = self._run_batches(self.stage(images), patch_masks, level,
                                             (slice(m, m + sp), slice(m, m + sp)))
        patch_masks = {k: v.numpy() for k, v in patch_masks.items()}
        kept_finite = np.isfinite(kept).all(-1)
        non_finite = 0
        for i, chip in enumerate(chips):
            if level == "chip":
                oy, ox = chip.row - block.out_y.start, chip.col - block.out_x.start
                ok = bool(kept_valid[i])
                non_finite += ok and not kept_finite[i]
                ok = ok and bool(kept_finite[i])
                valid[oy, ox] = ok
                emb[oy, ox] = kept[i] if ok else np.nan
                for k in images:
                    mvalid[k][oy, ox] = patch_masks[k][i].any()
                continue
            oy, ox = chip.py0 - block.out_y.start, chip.px0 - block.out_x.start
            ok = kept_valid[i][:chip.ph, :chip.pw]
            finite = kept_finite[i][:chip.ph, :chip.pw]
            non_finite += int((ok & ~finite).sum())
            ok = ok & finite
            tile = kept[i][:chip.ph, :chip.pw].copy()
            tile[~ok] = np.nan
            emb[oy:oy + chip.ph, ox:ox + chip.pw] = tile
            valid[oy:oy + chip.ph, ox:ox + chip.pw] = ok
            for k in images:
                mvalid[k][oy:oy + chip.ph, ox:ox + chip.pw] = patch_masks[k][i][m:m + chip.ph, m:m + chip.pw]
        if non_finite:
            logger.warning("block (%d, %d): %d of %d output positions are NaN/inf and are marked invalid "
                           "(model parameters not finite, or inputs that overflow float32)",
                           block.by, block.bx, non_finite, h * w)
        return BlockResult(block, emb, valid, mvalid)

    # ------------------------------------------------------------------ pipeline
    def run(self, arrays: Mapping[str, tuple[Any, Any]], grid: ChipGrid, level: str,
            block_chips: int = 4, blocks: list[Block] | None = None,
            progress: Any = None) -> Iterator[BlockResult]:
        """Yield :class:`BlockResult` per block; reading overlaps with the model via a thread."""
        todo = plan_blocks(grid, level, block_chips) if blocks is None else blocks
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def reader() -> None:
            try:
                for block in todo:
                    if stop.is_set():
                        return
                    chips, images, masks = self.read_block(arrays, grid, block)
                    item = (block, chips, self.stage(images), masks)   # masks stay on the host (process)
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                q.put(done)
            except BaseException as exc:  # handed to the consumer, re-raised there
                q.put(exc)

        thread = threading.Thread(target=reader, name="terrafm-chip-reader", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                block, chips, images, masks = item
                result = self.process(grid, block, level, chips, images, masks)
                logger.debug("block (%d, %d): %d chips", block.by, block.bx, len(chips))
                if progress is not None:
                    progress.update(len(chips))
                yield result
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(0.05)
