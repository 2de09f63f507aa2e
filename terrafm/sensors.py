"""Sensor facts TerraFM was trained on: modalities, band order, scaling, nodata and normalization.

Every constant here comes from the TerraFM release (normalization published with the model in
TerraTorch PR #947). Other modules read these tables; nothing else in terrafm hard-codes a band
name, a mean or a nodata value.

Normalization: ``x' = (x - (mu - 2 sigma)) / (4 sigma)``, no clipping, so ``mu`` maps to 0.5.
Sentinel-1 linear power is converted to decibels (``10 log10``) before normalizing.

Works for numpy arrays and torch tensors alike; torch is never imported here.

Examples
--------
>>> import numpy as np
>>> from terrafm import sensors
>>> sensors.MODALITIES["s1"].bands
('vv', 'vh')
>>> x = np.full((2, 4, 4), 0.1, dtype="float32")          # linear power, -10 dB
>>> sensors.normalize(x, "s1")[0, 0, 0].round(4)
np.float32(0.6178)
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = [
    "ModalitySpec",
    "MODALITIES",
    "MODALITY_KEYS",
    "S2_BANDS",
    "S1_BANDS",
    "PATCH_SIZE",
    "S2_NODATA",
    "S1_NODATA",
    "NORMALIZATION_FORMULA",
    "MIN_VALID_FRACTION",
    "S2_BASELINE_OFFSET",
    "S2_OFFSET_BASELINE",
    "S2_OFFSET_START",
    "get_modality",
    "linear_to_db",
    "normalize",
    "denormalize",
    "fill_missing_bands",
    "validate_bands",
]

PATCH_SIZE = 16
"""Side of one ViT patch in pixels (160 m at 10 m resolution)."""

S2_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12",
)
"""The 12 Sentinel-2 bands in TerraFM order (B10 dropped from L1C)."""

S1_BANDS: tuple[str, ...] = ("vv", "vh")
"""Sentinel-1 polarisations in TerraFM order."""

S2_NODATA = 0
S1_NODATA = -32768.0

MIN_VALID_FRACTION = 0.5
"""A 16 x 16 patch counts as valid for a modality when at least this fraction of its pixels is."""

NORMALIZATION_FORMULA = "(x - (mu - 2 sigma)) / (4 sigma)"
"""What :func:`normalize` computes (recorded in attrs of normalized arrays and embeddings)."""

S2_BASELINE_OFFSET = 1000
"""DN offset added to Sentinel-2 products of processing baseline 04.00 and later."""
S2_OFFSET_BASELINE = "04.00"
S2_OFFSET_START = _dt.date(2022, 1, 25)
"""First acquisition date processed with baseline 04.00 (the +1000 DN offset)."""


@dataclass(frozen=True)
class ModalitySpec:
    """What TerraFM expects for one input modality.

    Attributes
    ----------
    key : str
        Modality key used by the model (``"s2_l2a"``, ``"s2_l1c"``, ``"s1"``).
    bands : tuple of str
        Band names in model channel order.
    mean, std : tuple of float
        Per-band statistics of the stored values (DN for S2, dB for S1).
    nodata : float
        Stored nodata value.
    to_db : bool
        Whether stored values are linear power converted to dB before normalizing.
    description : str
        Human-readable name.
    """

    key: str
    bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    nodata: float
    to_db: bool
    description: str
    aliases: tuple[str, ...] = field(default=())

    @property
    def n_bands(self) -> int:
        return len(self.bands)

    def band_index(self, band: str) -> int:
        """Channel index of ``band`` (case-insensitive)."""
        upper = [b.upper() for b in self.bands]
        try:
            return upper.index(band.upper())
        except ValueError:
            raise KeyError(
                f"band {band!r} is not a {self.key} band; expected one of {list(self.bands)}"
            ) from None


MODALITIES: dict[str, ModalitySpec] = {
    "s2_l2a": ModalitySpec(
        key="s2_l2a",
        bands=S2_BANDS,
        mean=(1033.9414, 1135.3391, 1382.2553, 1526.9789, 1883.3911, 2516.2726,
              2782.7811, 2829.3833, 2977.2936, 3004.2905, 2832.1983, 2186.6507),
        std=(2761.4226, 807.365, 919.6919, 1221.4198, 1265.8146, 1323.0764,
             1428.7845, 1459.0343, 1497.9797, 1577.071, 1738.6128, 1620.8854),
        nodata=S2_NODATA,
        to_db=False,
        description="Sentinel-2 L2A surface reflectance (DN = reflectance x 10000)",
        aliases=("sentinel-2-l2a", "s2l2a", "l2a"),
    ),
    "s2_l1c": ModalitySpec(
        key="s2_l1c",
        bands=S2_BANDS,
        mean=(2153.94, 1937.191, 1885.8236, 1906.7263, 2096.8369, 2692.8083,
              3015.8569, 2930.3957, 3243.99, 1389.849, 2915.8289, 2186.0514),
        std=(581.6321, 619.9756, 714.7784, 1018.3657, 1021.4312, 1116.4055,
             1265.8559, 1234.6123, 1374.9582, 608.362, 1547.9093, 1336.0316),
        nodata=S2_NODATA,
        to_db=False,
        description="Sentinel-2 L1C top-of-atmosphere reflectance (DN)",
        aliases=("sentinel-2-l1c", "s2l1c", "l1c"),
    ),
    "s1": ModalitySpec(
        key="s1",
        bands=S1_BANDS,
        mean=(-12.7572, -19.6423),
        std=(5.8491, 5.8516),
        nodata=S1_NODATA,
        to_db=True,
        description="Sentinel-1 RTC backscatter, linear power (VV, VH)",
        aliases=("sentinel-1-rtc", "s1rtc", "s1_rtc", "sar"),
    ),
}

MODALITY_KEYS: tuple[str, ...] = tuple(MODALITIES)


def get_modality(key: str) -> ModalitySpec:
    """Return the :class:`ModalitySpec` for ``key`` or one of its aliases.

    Raises
    ------
    KeyError
        For an unknown key, listing the valid ones.

    Examples
    --------
    >>> get_modality("sentinel-1-rtc").key
    's1'
    """
    lowered = key.lower()
    if lowered in MODALITIES:
        return MODALITIES[lowered]
    for spec in MODALITIES.values():
        if lowered in spec.aliases:
            return spec
    raise KeyError(
        f"unknown modality {key!r}; TerraFM knows {list(MODALITIES)} "
        "(Sentinel-2 L2A, Sentinel-2 L1C, Sentinel-1 RTC)"
    )


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _stat_array(values: Sequence[float], like: Any, channel_axis: int):
    """Per-channel statistics shaped to broadcast against ``like`` along ``channel_axis``."""
    ndim = like.ndim
    axis = channel_axis % ndim
    shape = [1] * ndim
    shape[axis] = len(values)
    if _is_torch(like):
        import torch

        dtype = like.dtype if like.is_floating_point() else torch.float32
        return torch.tensor(values, dtype=dtype, device=like.device).reshape(shape)
    dtype = like.dtype if np.issubdtype(like.dtype, np.floating) else np.float32
    return np.asarray(values, dtype=dtype).reshape(shape)


def _as_float(x: Any):
    if _is_torch(x):
        return x if x.is_floating_point() else x.float()
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)


DB_FLOOR = 1e-10
"""Linear power below this is clipped before the dB conversion (zero power stays finite)."""


def linear_to_db(x: Any, floor: float = DB_FLOOR):
    """Convert linear backscatter power to decibels, ``10 log10(max(x, floor))``.

    The floor keeps zero or negative power (border artefacts) finite; nodata must be masked
    separately.

    Examples
    --------
    >>> round(float(linear_to_db(np.float32(0.01))), 4)
    -20.0
    """
    x = _as_float(x)
    if _is_torch(x):
        return 10.0 * x.clamp_min(floor).log10()
    return (10.0 * np.log10(np.maximum(x, floor))).astype(x.dtype, copy=False)


def _check_channels(x: Any, spec: ModalitySpec, channel_axis: int) -> None:
    if x.ndim == 0:
        raise ValueError(f"{spec.key}: expected an array with a channel axis, got a scalar")
    n = x.shape[channel_axis]
    if n != spec.n_bands:
        raise ValueError(
            f"{spec.key}: expected {spec.n_bands} channels {list(spec.bands)} on axis "
            f"{channel_axis}, got {n}. Reorder or select the bands in this order, or use "
            "terrafm.sensors.fill_missing_bands for a product that lacks some bands."
        )


def normalize(x: Any, modality: str, channel_axis: int = -3, inplace: bool = False):
    """Normalize stored values of one modality to the model's input scale.

    Parameters
    ----------
    x : numpy.ndarray or torch.Tensor
        Stored values (S2 DN, S1 linear power) with bands in :data:`MODALITIES` order along
        ``channel_axis``. Integers are promoted to float32; float dtypes are kept.
    modality : str
        Modality key or alias.
    channel_axis : int, default -3
        Band axis: ``-3`` fits (C, H, W) and (B, C, H, W).
    inplace : bool, default False
        Overwrite ``x`` (a floating numpy array) instead of allocating: for large blocks.

    Returns
    -------
    Same type as ``x``: ``(v - (mu - 2 sigma)) / (4 sigma)`` with ``v`` in dB for S1.

    Examples
    --------
    >>> import numpy as np
    >>> spec = MODALITIES["s2_l2a"]
    >>> x = np.asarray(spec.mean, dtype="float32")[:, None, None]  # the mean maps to 0.5
    >>> np.allclose(normalize(x, "s2_l2a"), 0.5)
    True
    """
    spec = get_modality(modality)
    _check_channels(x, spec, channel_axis)
    if inplace and not (isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating)):
        raise TypeError("normalize(inplace=True) needs a floating numpy array; pass inplace=False")
    x = x if inplace else _as_float(x)
    if spec.to_db:
        if inplace:
            np.log10(np.maximum(x, DB_FLOOR, out=x), out=x)
            x *= 10.0
        else:
            x = linear_to_db(x)
    mean = _stat_array(spec.mean, x, channel_axis)
    std = _stat_array(spec.std, x, channel_axis)
    low, scale = mean - 2.0 * std, 4.0 * std
    if inplace:
        x -= low
        x /= scale
        return x
    return (x - low) / scale


def denormalize(x: Any, modality: str, channel_axis: int = -3):
    """Inverse of :func:`normalize` (S1 comes back in dB, not linear power).

    Examples
    --------
    >>> x = np.full((2, 1, 1), 0.5, dtype="float32")
    >>> denormalize(x, "s1")[:, 0, 0].tolist() == [np.float32(-12.7572), np.float32(-19.6423)]
    True
    """
    spec = get_modality(modality)
    _check_channels(x, spec, channel_axis)
    x = _as_float(x)
    mean = _stat_array(spec.mean, x, channel_axis)
    std = _stat_array(spec.std, x, channel_axis)
    return x * (4.0 * std) + (mean - 2.0 * std)


def validate_bands(names: Sequence[str], modality: str) -> list[str]:
    """Check that ``names`` are exactly the modality's bands in TerraFM order.

    Returns the canonical names. Raises ``ValueError`` naming what is missing, extra or out of
    order and how to fix it.

    Examples
    --------
    >>> validate_bands(["VV", "VH"], "s1")
    ['vv', 'vh']
    """
    spec = get_modality(modality)
    upper = [str(n).upper() for n in names]
    expected = [b.upper() for b in spec.bands]
    if upper == expected:
        return list(spec.bands)
    missing = [b for b, u in zip(spec.bands, expected) if u not in upper]
    extra = [n for n, u in zip(names, upper) if u not in expected]
    if missing or extra:
        raise ValueError(
            f"{spec.key}: bands {list(names)} do not match TerraFM's {list(spec.bands)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {extra}" if extra else "")
            + ". Select the expected bands (missing S2 bands can be filled with "
            "terrafm.sensors.fill_missing_bands)."
        )
    raise ValueError(
        f"{spec.key}: bands {list(names)} are in the wrong order; TerraFM expects "
        f"{list(spec.bands)}. Reorder them, e.g. ds[{list(spec.bands)}]."
    )


def fill_missing_bands(x: np.ndarray, present: Sequence[str], modality: str,
                       channel_axis: int = -3) -> tuple[np.ndarray, list[str]]:
    """Complete a stored-value array to the modality's full band set.

    Missing bands are filled with the band mean ``mu`` (0.5 after normalization), as the
    TerraFM reference prescribes. Present bands may come in any order; the output is in TerraFM
    order.

    Parameters
    ----------
    x : numpy.ndarray
        Stored values with ``len(present)`` bands on ``channel_axis``.
    present : sequence of str
        Names of the bands in ``x``, in the order they appear.
    modality : str
        Modality key or alias.
    channel_axis : int, default -3

    Returns
    -------
    filled : numpy.ndarray
        Array with all bands in TerraFM order (float32 unless ``x`` was a wider float).
    filled_bands : list of str
        Names of the bands that were filled.

    Examples
    --------
    >>> x = np.ones((10, 2, 2), dtype="uint16")
    >>> bands = [b for b in S2_BANDS if b not in ("B01", "B09")]
    >>> full, filled = fill_missing_bands(x, bands, "s2_l2a")
    >>> full.shape, filled
    ((12, 2, 2), ['B01', 'B09'])
    """
    spec = get_modality(modality)
    x = np.asarray(x)
    if x.shape[channel_axis] != len(present):
        raise ValueError(
            f"{spec.key}: array has {x.shape[channel_axis]} bands but {len(present)} names "
            f"were given ({list(present)})"
        )
    index = {str(b).upper(): i for i, b in enumerate(present)}
    unknown = [b for b in index if b not in {s.upper() for s in spec.bands}]
    if unknown:
        raise ValueError(f"{spec.key}: unknown bands {unknown}; expected a subset of {list(spec.bands)}")
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
    moved = np.moveaxis(x, channel_axis, 0)
    out = np.empty((spec.n_bands,) + moved.shape[1:], dtype=dtype)
    filled: list[str] = []
    for i, band in enumerate(spec.bands):
        j = index.get(band.upper())
        if j is None:
            fill = spec.mean[i] if not spec.to_db else 10 ** (spec.mean[i] / 10)
            out[i] = fill
            filled.append(band)
        else:
            out[i] = moved[j]
    return np.moveaxis(out, 0, channel_axis), filled


# =================================================================================================
# Catalog / collection table: which STAC collection carries which modality, under which asset keys
# (used by terrafm.stac; the band/normalization constants above are unchanged)
# =================================================================================================

@dataclass(frozen=True)
class CollectionSpec:
    """How one STAC collection of one catalog maps onto a TerraFM modality (or a label layer).

    Attributes
    ----------
    collection : str
        Collection id in the catalog.
    modality : str
        ``"s2_l2a"``, ``"s2_l1c"``, ``"s1"`` or ``"worldcover"``.
    assets : dict
        TerraFM band name -> asset key (``{"B02": "blue"}`` on Earth Search).
    mask_asset : str or None
        Asset key of the S2 scene classification (``SCL``), if any.
    scale, offset : float
        Physical value = DN * scale + offset (informational; terrafm keeps DN).
    nodata : float
        Stored no-data value.
    dtype : str
        Stored data type.
    """

    collection: str
    modality: str
    assets: dict
    mask_asset: str | None
    scale: float
    offset: float
    nodata: float
    dtype: str


_PC_S2 = {b: b for b in S2_BANDS}
_ES_S2 = {"B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1",
          "B06": "rededge2", "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B09": "nir09",
          "B11": "swir16", "B12": "swir22"}

CATALOGS: dict[str, dict[str, Any]] = {
    "planetary-computer": {
        "url": "https://planetarycomputer.microsoft.com/api/stac/v1",
        "sign": "planetary-computer",
        "collections": {
            "sentinel-2-l2a": CollectionSpec("sentinel-2-l2a", "s2_l2a", _PC_S2, "SCL", 1e-4, 0.0, S2_NODATA, "uint16"),
            "sentinel-1-rtc": CollectionSpec("sentinel-1-rtc", "s1", {"vv": "vv", "vh": "vh"}, None, 1.0, 0.0, S1_NODATA, "float32"),
            "esa-worldcover": CollectionSpec("esa-worldcover", "worldcover", {"worldcover": "map"}, None, 1.0, 0.0, 0, "uint8"),
        },
    },
    "earth-search": {
        "url": "https://earth-search.aws.element84.com/v1",
        "sign": None,
        "collections": {
            "sentinel-2-l2a": CollectionSpec("sentinel-2-l2a", "s2_l2a", _ES_S2, "scl", 1e-4, -0.1, S2_NODATA, "uint16"),
            "sentinel-2-l1c": CollectionSpec("sentinel-2-l1c", "s2_l1c", _ES_S2, None, 1e-4, 0.0, S2_NODATA, "uint16"),
        },
    },
}
"""Known catalogs: endpoint, signing, and per collection id its :class:`CollectionSpec`."""

SCL_INVALID_CLASSES: tuple[int, ...] = (0, 1, 3, 8, 9, 10)
"""SCL classes masked as invalid: no data, saturated/defective, cloud shadow, cloud medium and high
probability, thin cirrus."""


def collection_spec(catalog: str, collection: str) -> CollectionSpec:
    """Look up ``collection`` in ``catalog``, raising a clear error naming the known ids.

    Examples
    --------
    >>> collection_spec("earth-search", "sentinel-2-l1c").assets["B08"]
    'nir'
    """
    if catalog not in CATALOGS:
        raise KeyError(f"unknown catalog {catalog!r}; known catalogs: {list(CATALOGS)}")
    table = CATALOGS[catalog]["collections"]
    if collection not in table:
        raise KeyError(
            f"collection {collection!r} is not known for catalog {catalog!r}; use one of "
            f"{list(table)} (Sentinel-2 L1C is on 'earth-search', Sentinel-1 RTC on 'planetary-computer')"
        )
    return table[collection]
