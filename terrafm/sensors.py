"""The modality registry: every rule about a sensor lives here, once, as data.

One :class:`Modality` object per model input owns its band names and order, stored dtype and
nodata, validity rule (quality-mask decoding, nodata, finiteness, positivity), normalization
(including the dB conversion), DN offset rule (the Sentinel-2 processing-baseline offset), the
variable names it takes in a Dataset, how each STAC catalog publishes it (:class:`Collection`:
collection id, asset keys, scale/offset) and its Major-TOM columns. Label layers that are not
model inputs (ESA WorldCover) are :class:`Layer` objects. ``stac``, ``prepare``, ``engine``, the
model's input checks and ``pretrain`` loop over :data:`MODALITIES`; none of them names a sensor.
Adding a sensor is one :func:`register_modality` call (and a model config that lists it).

Normalization (TerraTorch PR #947): ``x' = (x - (mu - 2 sigma)) / (4 sigma)``, no clipping, so
``mu`` maps to 0.5; linear power is converted to decibels (``10 log10``) first.

Dataset contract: a band is the variable ``<key>_<band>`` (``s2_l2a_B04``, ``s2_l1c_B04``,
``s1_vv``), the pixel validity ``mask_<key>``; Sentinel-2 L2A and L1C can therefore sit side by
side. Works for numpy arrays, dask arrays and torch tensors; torch is never imported here.

Examples
--------
>>> import numpy as np
>>> from terrafm import sensors
>>> sensors.MODALITIES["s1"].bands, sensors.MODALITIES["s1"].variables
(('vv', 'vh'), ('s1_vv', 's1_vh'))
>>> x = np.full((2, 4, 4), 0.1, dtype="float32")          # linear power, -10 dB
>>> sensors.normalize(x, "s1")[0, 0, 0].round(4)
np.float32(0.6178)
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "Modality", "Collection", "BaselineOffset", "QualityMask", "MajorTOM", "Layer",
    "MODALITIES", "LAYERS", "RELEASE_MODALITIES", "register_modality", "unregister_modality",
    "register_layer", "get_modality", "S2_BANDS", "S1_BANDS", "PATCH_SIZE", "MIN_VALID_FRACTION",
    "NORMALIZATION_FORMULA", "FILL_VALUE", "patch_valid", "linear_to_db", "normalize", "denormalize",
    "fill_missing_bands", "validate_bands", "Plausibility", "UnitMistake", "PIXEL_SIZE", "VALIDATION_RULES",
]

PATCH_SIZE = 16
"""Side of one ViT patch in pixels (160 m at 10 m resolution)."""

PIXEL_SIZE = 10.0
"""Ground size in metres of one input pixel, the model's (every modality is read on a 10 m grid)."""

NONPOSITIVE_WARN_FRACTION = 0.05
"""A ``positive`` modality warns when at least this fraction of its sampled values is <= 0."""

VALIDATION_RULES = "README, 'Validation rules'"
"""Where the input checks are documented; error messages point there."""

MIN_VALID_FRACTION = 0.5
"""A 16 x 16 patch counts as valid for a modality when at least this fraction of its pixels is."""

NORMALIZATION_FORMULA = "(x - (mu - 2 sigma)) / (4 sigma)"
"""What :func:`normalize` computes (recorded in attrs of normalized arrays and embeddings)."""

FILL_VALUE = 0.5
"""Normalized value given to invalid pixels (the band mean, ``mu``)."""

DB_FLOOR = 1e-10
"""Linear power below this is clipped before the dB conversion (zero power stays finite)."""

S2_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12",
)
"""The 12 Sentinel-2 bands in TerraFM order (B10 dropped from L1C)."""

S1_BANDS: tuple[str, ...] = ("vv", "vh")
"""Sentinel-1 polarisations in TerraFM order."""


# =================================================================================================
# the parts of a modality
# =================================================================================================
@dataclass(frozen=True)
class Collection:
    """How one STAC catalog publishes one modality (or label layer).

    Attributes
    ----------
    id : str
        Collection id in that catalog.
    assets : mapping
        Band name -> asset key (``{"B02": "blue"}`` on Earth Search).
    mask : str or None
        Asset key of the quality layer (the modality's :class:`QualityMask`), if the catalog has one.
    scale, offset : float
        Physical value = DN * scale + offset as the catalog states it (informational: terrafm
        keeps stored DN, whose statistics the model was trained on).

    Examples
    --------
    >>> MODALITIES["s2_l1c"].collections["earth-search"].assets["B8A"]
    'nir08'
    """

    id: str
    assets: Mapping[str, str]
    mask: str | None = None
    scale: float = 1.0
    offset: float = 0.0


@dataclass(frozen=True)
class QualityMask:
    """A categorical quality layer decoded into pixel validity (Sentinel-2 scene classification).

    Examples
    --------
    >>> scl = MODALITIES["s2_l2a"].quality
    >>> scl.decode(np.array([4, 8, 0], "uint8")).tolist()   # vegetation, cloud, no data
    [True, False, False]
    """

    name: str
    invalid_classes: tuple[int, ...]
    description: str
    dtype: str = "uint8"
    nodata: int = 0

    def decode(self, codes):
        """``True`` where a class code is a usable observation (numpy or dask codes)."""
        table = np.ones(256, dtype=bool)
        table[list(self.invalid_classes)] = False
        if isinstance(codes, np.ndarray):
            return table[codes]
        return codes.map_blocks(table.__getitem__, dtype=bool)


@dataclass(frozen=True)
class BaselineOffset:
    """A DN offset that products from some processing baseline on carry.

    Sentinel-2 products of baseline 04.00 and later (acquired from 2022-01-25) store
    ``DN = 10000 * reflectance + 1000``. The one harmonization rule, used by
    :func:`terrafm.stac.load`, :func:`terrafm.prepare.normalize`, :func:`terrafm.embed` and the
    pretraining reader alike: a pixel's validity is decided on the stored DN (nodata stays
    nodata), and a valid DN becomes ``max(DN - offset, floor)``: a valid pixel stays valid, a
    slightly negative reflectance becomes the smallest positive DN.

    A product states its baseline in the item property ``property``, else in its product name
    (``name_pattern`` in ``name_properties`` or the name given: ``_N0509_`` is 05.09, and ESA's
    reprocessed archive carries the offset on dates before ``start`` too); only without either
    does the acquisition date decide.

    Examples
    --------
    >>> rule = MODALITIES["s2_l2a"].offset
    >>> rule.present(baseline="04.00"), rule.present(baseline="03.01"), rule.present(acquired=_dt.date(2023, 1, 1))
    (True, False, True)
    >>> rule.baseline_in(name="S2A_MSIL2A_20190102T103431_N0500_R108_T32TMT_20230101T000000")
    '05.00'
    """

    dn: int
    property: str
    since: str
    start: _dt.date
    floor: int = 1
    name_pattern: str | None = None
    name_properties: tuple[str, ...] = ()

    def baseline_in(self, properties: Mapping[str, Any] | None = None, name: str | None = None) -> str | None:
        """The processing baseline a product states (its property, else its product name), or None."""
        properties = properties or {}
        if properties.get(self.property):
            return str(properties[self.property])
        if self.name_pattern:
            for text in [*(properties.get(p) for p in self.name_properties), name]:
                match = re.search(self.name_pattern, str(text or ""))
                if match:
                    return f"{match[1]}.{match[2]}"
        return None

    def present(self, baseline: str | None = None, acquired: Any = None) -> bool:
        """Whether a product carries the offset: from its baseline when known, else its date."""
        if baseline:
            return str(baseline) >= self.since
        if acquired is not None:
            day = acquired.date() if isinstance(acquired, _dt.datetime) else acquired
            return day >= self.start
        return False


@dataclass(frozen=True)
class MajorTOM:
    """Where a modality lives in Major-TOM Core: sub-directories and band columns (band order)."""

    dirs: tuple[str, ...]
    columns: tuple[str, ...]


@dataclass(frozen=True)
class UnitMistake:
    """A known way of handing a modality's values in the wrong unit, recognised on a sample.

    The values look like ``looks_like`` when at least ``fraction`` of the sampled values (finite,
    not nodata) lie in ``[low, high)``: a range that values in the right unit essentially never
    fill (Sentinel-1 linear power is never mostly negative; Sentinel-2 DN are never mostly <= 2).

    Examples
    --------
    >>> db = MODALITIES["s1"].plausible.mistakes[0]
    >>> db.looks_like, db.matches(np.array([-12.0, -18.5, -7.0])), db.matches(np.array([0.06, 0.01, 0.2]))
    ('dB', True, False)
    """

    looks_like: str
    low: float
    high: float
    fraction: float
    fix: str

    def matches(self, values: np.ndarray) -> bool:
        """Whether ``values`` (finite, nodata removed) look like this mistake."""
        values = np.asarray(values)
        if values.size == 0:
            return False
        return self.share(values) >= self.fraction

    def share(self, values: np.ndarray) -> float:
        """Fraction of ``values`` in ``[low, high)``."""
        return float(((values >= self.low) & (values < self.high)).mean()) if np.size(values) else 0.0


@dataclass(frozen=True)
class Plausibility:
    """What stored values of a modality can be, checked on a sample before any model work.

    Attributes
    ----------
    dtypes : tuple of str
        Accepted stored dtypes (anything else, e.g. int8, bool or complex, is refused).
    range : (float, float)
        Values a valid pixel can hold (nodata excluded); any sampled value outside is an error.
    typical : (float, float)
        Where the median of a real scene's valid values lies; outside it is a warning.
    mistakes : tuple of UnitMistake
        Wrong units recognised on the sample, each with its fix (errors).
    dtype_fix : str
        How to get an accepted dtype.

    Examples
    --------
    >>> MODALITIES["s2_l2a"].plausible.range
    (0.0, 65535.0)
    """

    dtypes: tuple[str, ...]
    range: tuple[float, float]
    typical: tuple[float, float]
    mistakes: tuple[UnitMistake, ...] = ()
    dtype_fix: str = ""


@dataclass(frozen=True)
class Modality:
    """Everything terrafm knows about one model input; see the module docstring.

    Attributes
    ----------
    key : str
        Model key (``"s2_l2a"``); the stem ``conv2d_<key>`` and Dataset names derive from it.
    bands : tuple of str
        Band names in model channel order.
    mean, std : tuple of float
        Per-band statistics of the stored values (in dB when ``to_db``).
    dtype : str
        Stored data type.
    nodata : float
        Stored nodata value.
    units : str
        Unit of stored values (``"DN"``, ``"linear power"``).
    to_db : bool
        Stored linear power is converted to dB before normalizing.
    positive : bool
        Only values > 0 are valid (power cannot be zero or negative).
    description : str
    aliases : tuple of str
        Other names :func:`get_modality` accepts.
    paired : bool
        Acquired on its own schedule: a joint load puts it on the dates of the other modalities
        (nearest acquisition within a window) instead of adding its own dates.
    quality : QualityMask, optional
        Quality layer decoded into validity.
    offset : BaselineOffset, optional
        DN offset rule.
    collections : mapping
        Catalog name -> :class:`Collection`.
    band_aliases : mapping
        Band -> other names that identify it in a foreign catalog's asset keys or ``eo:bands``.
    product_hints : mapping
        Item property -> values that identify this modality among ones with the same bands.
    majortom : MajorTOM, optional
    cloud_cover : str, optional
        Item property stating the scene's cloud cover (optical modalities), for ``max_cloud``.
    plausible : Plausibility, optional
        Accepted dtypes, plausible and typical value ranges, recognised unit mistakes
        (:meth:`check_values`, run by :mod:`terrafm.validate` before any model work).
    """

    key: str
    bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dtype: str
    nodata: float
    units: str
    description: str
    to_db: bool = False
    positive: bool = False
    aliases: tuple[str, ...] = ()
    paired: bool = False
    quality: QualityMask | None = None
    offset: BaselineOffset | None = None
    collections: Mapping[str, Collection] = field(default_factory=dict)
    band_aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    product_hints: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    majortom: MajorTOM | None = None
    cloud_cover: str | None = None
    plausible: Plausibility | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.key.isidentifier() or self.key != self.key.lower():
            problems.append("key must be a lower-case identifier")
        if not self.bands or len(set(self.bands)) != len(self.bands):
            problems.append(f"bands {self.bands} must be non-empty and distinct")
        if not len(self.mean) == len(self.std) == len(self.bands):
            problems.append(f"{len(self.bands)} bands need as many means and stds")
        if any(s <= 0 for s in self.std):
            problems.append("every std must be > 0")
        for catalog, collection in self.collections.items():
            missing = [b for b in self.bands if b not in collection.assets]
            if missing:
                problems.append(f"collection {collection.id!r} of {catalog!r} lacks asset keys for {missing}")
        if problems:
            raise ValueError(f"invalid modality {self.key!r}: " + "; ".join(problems))

    # ---------------------------------------------------------------- names in a Dataset
    @property
    def n_bands(self) -> int:
        return len(self.bands)

    def variable(self, band: str) -> str:
        """Dataset variable of ``band`` (``s2_l1c_B04``)."""
        return f"{self.key}_{band}"

    @property
    def variables(self) -> tuple[str, ...]:
        """Dataset variables of all bands, in band order."""
        return tuple(self.variable(b) for b in self.bands)

    @property
    def mask_variable(self) -> str:
        return f"mask_{self.key}"

    @property
    def band_dim(self) -> str:
        """Band dimension of the normalized stack (``band_s1``)."""
        return f"band_{self.key}"

    @property
    def offset_coord(self) -> str:
        """Per-time coordinate holding the DN offset still in the stored values."""
        return f"{self.key}_offset"

    @property
    def gap_variable(self) -> str:
        """For a paired modality: its acquisition time minus the date it was paired to."""
        return f"{self.key}_time_gap"

    @property
    def quality_variable(self) -> str | None:
        return None if self.quality is None else f"{self.key}_{self.quality.name}"

    @property
    def missing_value(self):
        """What a date without an acquisition holds: NaN for float bands, else nodata."""
        return np.nan if np.issubdtype(np.dtype(self.dtype), np.floating) else self.nodata

    def band_index(self, band: str) -> int:
        """Channel index of ``band`` (case-insensitive)."""
        upper = [b.upper() for b in self.bands]
        try:
            return upper.index(band.upper())
        except ValueError:
            raise KeyError(f"band {band!r} is not a {self.key} band; expected one of {list(self.bands)}") from None

    # ---------------------------------------------------------------- the validity rule
    def pixel_valid(self, bands: Sequence[Any], quality: Any = None, mask: Any = None):
        """The one pixel-validity rule: every band not nodata, finite, (> 0 if ``positive``),
        the quality layer's class usable, and ``mask`` (a caller's own validity) True.

        ``bands`` is a sequence of per-band arrays (numpy or dask, same shape) or an array with
        the bands on axis -3. Returns a bool array of one band's shape.

        Examples
        --------
        >>> s1 = MODALITIES["s1"]
        >>> s1.pixel_valid([np.array([0.1, 0.0, -32768.0, np.nan]), np.array([0.01, 0.02, 0.03, 0.04])]).tolist()
        [True, False, False, False]
        """
        if not isinstance(bands, (list, tuple)):
            bands = [bands[..., i, :, :] for i in range(bands.shape[-3])]
        valid = None
        for band in bands:
            ok = band != self.nodata
            if np.issubdtype(band.dtype, np.floating):
                ok = ok & np.isfinite(band)
            if self.positive:
                ok = ok & (band > 0)
            valid = ok if valid is None else valid & ok
        if quality is not None and self.quality is not None:
            valid = valid & self.quality.decode(quality)
        if mask is not None:
            valid = valid & mask.astype(bool)
        return valid

    def harmonize(self, dn, offset):
        """Stored DN minus the baseline offset still in them (``offset``: scalar or broadcastable),
        by the rule of :class:`BaselineOffset`; nodata stays nodata, the dtype is kept.

        Examples
        --------
        >>> MODALITIES["s2_l2a"].harmonize(np.array([0, 500, 1000, 1001, 3000], "uint16"), 1000).tolist()
        [0, 1, 1, 1, 2000]
        """
        if self.offset is None:
            return dn
        wide = dn.astype("int32") if np.issubdtype(dn.dtype, np.integer) else dn
        shifted = np.maximum(wide - np.asarray(offset, dtype=wide.dtype), self.offset.floor)
        return np.where(dn != self.nodata, shifted, self.nodata).astype(dn.dtype)

    def stored_offset(self, baseline: str | None = None, acquired: Any = None) -> int:
        """DN offset in a product's stored values (0 when the modality has no offset rule)."""
        return self.offset.dn if self.offset is not None and self.offset.present(baseline, acquired) else 0

    def model_input(self, stored, mask=None, offset=None):
        """Stored values ``(..., C, y, x)`` -> (float32 model input, bool validity ``(..., y, x)``):
        validity decided on the stored values (:meth:`pixel_valid` and ``mask``), then the DN offset
        still in them removed (:meth:`harmonize`; ``offset`` scalar or broadcastable against the
        values), then :meth:`normalize`; invalid pixels hold :data:`FILL_VALUE`. The one path from
        stored values to the model, for inference and pretraining alike.

        Examples
        --------
        >>> dn = np.array([0, 500, 1000, 3000], "uint16").reshape(1, 1, 4).repeat(12, 0)
        >>> x, valid = MODALITIES["s2_l2a"].model_input(dn, offset=1000)
        >>> valid.tolist(), [round(float(v), 4) for v in x[3, 0]]   # B04: 0 nodata; 500, 1000 -> DN 1; 3000 -> 2000
        ([[False, True, True, True]], [0.5, 0.1877, 0.1877, 0.5968])
        """
        stored = np.asarray(stored)
        valid = self.pixel_valid(stored, mask=None if mask is None else np.asarray(mask))
        if offset is not None and np.any(offset):
            stored = self.harmonize(stored, offset)
        x = stored.astype(np.float32)                   # a fresh buffer, normalized in place
        self.normalize(x, channel_axis=-3, inplace=True)
        np.copyto(x, np.float32(FILL_VALUE), where=~np.expand_dims(valid, -3))
        return x, valid

    # ---------------------------------------------------------------- plausibility (terrafm.validate)
    def check_values(self, stored, mask=None) -> tuple[list[str], list[str]]:
        """Check a sample of stored values against :attr:`plausible`: ``(errors, warnings)``.

        ``stored``: the modality's bands on axis -3 (``(..., C, y, x)``, e.g. a few windows
        stacked), ``mask``: the Dataset's ``mask_<key>`` on the same windows. In this order: the
        dtype; the recognised unit mistakes (on every finite non-nodata value); values of valid
        pixels (:meth:`pixel_valid`) outside the plausible range; then warnings for a median
        outside the typical range and, for a ``positive`` modality, many values <= 0.

        Examples
        --------
        >>> s1 = MODALITIES["s1"]
        >>> errors, warnings = s1.check_values(np.full((2, 4, 4), -15.0, "float32"))
        >>> errors[0][:73]
        's1 looks like dB (100% of sampled values in [-100, 0)): pass linear power'
        >>> s1.check_values(np.full((2, 4, 4), 0.05, "float32"))
        ([], [])
        """
        rule = self.plausible
        if rule is None:
            return [], []
        stored = np.asarray(stored)
        dtype = np.dtype(stored.dtype)
        if dtype.name not in rule.dtypes:
            return [f"{self.key} bands have dtype {dtype.name}; {self.key} stores {self.units} as one of "
                    f"{list(rule.dtypes)}: {rule.dtype_fix}"], []
        values = stored.astype(np.float64)
        present = np.isfinite(values) & (values != self.nodata)
        sampled = values[present]
        if sampled.size == 0:
            return [], []
        for mistake in rule.mistakes:
            if mistake.matches(sampled):
                return [f"{self.key} looks like {mistake.looks_like} ({mistake.share(sampled):.0%} of sampled "
                        f"values in [{mistake.low:g}, {mistake.high:g})): {mistake.fix}"], []
        errors, warnings = [], []
        valid = self.pixel_valid(stored, mask=None if mask is None else np.asarray(mask))
        in_valid = np.moveaxis(values, -3, -1)[valid]         # (n valid pixels, C)
        low, high = rule.range
        outside = in_valid[(in_valid < low) | (in_valid > high)]
        if outside.size:
            common, counts = np.unique(outside, return_counts=True)
            worst = float(common[counts.argmax()])
            marker = counts.max() >= outside.size / 2 and worst.is_integer() and abs(worst) < 1e6
            overflow = np.abs(outside).max() > np.finfo(np.float32).max
            errors.append(
                f"{self.key}: {outside.size / max(in_valid.size, 1):.1%} of sampled values of valid pixels are "
                f"outside the plausible range [{low:g}, {high:g}] of {self.units} (most common: {worst:g}"
                + (", a nodata marker?" if marker else "")
                + ("; values beyond float32's range overflow to inf" if overflow else "") + "). "
                + (f"Set nodata to the registered {self.nodata:g} (ds[v] = ds[v].where(ds[v] != {worst:g}, "
                   f"{self.nodata:g})) or mark those pixels False in {self.mask_variable}" if marker else
                   f"Pass {self.units} ({self.description}), or mark impossible pixels False in "
                   f"{self.mask_variable}"))
        if errors:
            return errors, warnings
        if in_valid.size:
            median = float(np.median(in_valid))
            if not rule.typical[0] <= median <= rule.typical[1]:
                warnings.append(
                    f"{self.key}: the median of the sampled valid values is {median:.4g}, outside the typical "
                    f"[{rule.typical[0]:g}, {rule.typical[1]:g}] {self.units} of real scenes: check the unit "
                    f"({self.description})")
        if self.positive:
            share = float((sampled <= 0).mean())
            if share >= NONPOSITIVE_WARN_FRACTION:
                warnings.append(f"{self.key}: {share:.0%} of sampled values are <= 0 and count as invalid "
                                f"({self.units} must be > 0); if part of the data is in another unit, convert it")
        return errors, warnings

    def check_mask(self, mask) -> list[str]:
        """Check a sample of ``mask_<key>``: bool, or integers/floats holding only 0 and 1.

        Returns the errors (a mask of class codes, e.g. Sentinel-2 SCL, or with NaN, which
        ``astype(bool)`` would turn into True).

        Examples
        --------
        >>> MODALITIES["s2_l2a"].check_mask(np.array([4, 8, 9], "uint8"))[0][:51]
        'mask_s2_l2a holds values [4, 8, 9], not True/False:'
        >>> MODALITIES["s2_l2a"].check_mask(np.array([0, 1], "uint8"))
        []
        """
        mask = np.asarray(mask)
        if mask.dtype == bool:
            return []
        if mask.dtype.kind not in "uif":
            return [f"{self.mask_variable} has dtype {mask.dtype}; it must be bool (True where the pixel is valid)"]
        if mask.dtype.kind == "f" and np.isnan(mask).any():
            return [f"{self.mask_variable} holds NaN, which would count as valid (True); it must be bool: "
                    f"ds['{self.mask_variable}'] = ds['{self.mask_variable}'].fillna(0).astype(bool)"]
        values = np.unique(mask)
        if np.isin(values, (0, 1)).all():
            return []
        hint = ""
        if self.quality is not None:
            hint = (f" If these are {self.quality.name} classes ({self.quality.description}), decode them: "
                    f"ds['{self.mask_variable}'] = ~ds['{self.mask_variable}'].isin({list(self.quality.invalid_classes)})")
        shown = [v.item() for v in values[:8]]
        return [f"{self.mask_variable} holds values {shown}{' ...' if len(values) > 8 else ''}, not True/False: "
                f"it must be True where the pixel is valid.{hint}"]

    @property
    def normalized_range(self) -> tuple[float, float]:
        """Range of :meth:`normalize`'d values of plausible stored values, over all bands.

        Examples
        --------
        >>> [round(v, 2) for v in MODALITIES["s1"].normalized_range]
        [-3.23, 3.48]
        """
        if self.plausible is None:
            return -np.inf, np.inf
        low, high = self.plausible.range
        ends = np.array([[max(low, DB_FLOOR) if self.to_db else low] * self.n_bands,
                         [high] * self.n_bands], dtype=np.float64)[..., None, None]      # (2, C, 1, 1)
        normalized = normalize(ends, self)
        return float(normalized.min()), float(normalized.max())

    def check_normalized(self, x) -> list[str]:
        """Check a sample of already-normalized values (``prepare.normalize`` output): errors.

        Examples
        --------
        >>> MODALITIES["s2_l2a"].check_normalized(np.full((12, 2, 2), 1500.0))[0][:71]
        's2_l2a: 100% of the sampled values are outside [0.00312, 20.4], the ran'
        """
        x = np.asarray(x)
        if x.dtype.kind != "f":
            return [f"{self.key} holds normalized values but has dtype {x.dtype}; the output of "
                    "terrafm.prepare.normalize is float32"]
        finite = x[np.isfinite(x)]
        low, high = self.normalized_range
        slack = 0.05 * (high - low)
        outside = (finite < low - slack) | (finite > high + slack)
        if not outside.any():
            return []
        return [f"{self.key}: {outside.mean():.0%} of the sampled values are outside [{low:.3g}, {high:.3g}], the "
                f"range of normalized {self.units}: these look like stored values, not the output of "
                f"terrafm.prepare.normalize. Pass stored bands ({self.variables[0]}, ...) to embed, which "
                "normalizes them, or normalize them with terrafm.prepare.normalize(ds)"]

    def normalize(self, x, channel_axis: int = -3, inplace: bool = False):
        """:func:`normalize` for this modality."""
        return normalize(x, self, channel_axis, inplace)

    @property
    def normalization(self) -> str:
        """What :meth:`normalize` computes, for attrs."""
        return NORMALIZATION_FORMULA + (", x in dB" if self.to_db else "")


@dataclass(frozen=True)
class Layer:
    """A label layer loaded beside the modalities (not a model input): one variable, reduced over
    the items' dates with ``max``.

    Examples
    --------
    >>> LAYERS["worldcover"].collections["planetary-computer"].id
    'esa-worldcover'
    """

    key: str
    dtype: str
    nodata: int
    description: str
    collections: Mapping[str, Collection]

    @property
    def bands(self) -> tuple[str, ...]:
        return (self.key,)

    @property
    def variable(self) -> str:
        return self.key


# =================================================================================================
# the registry
# =================================================================================================
MODALITIES: dict[str, Modality] = {}
"""Registered modalities by key, in registration order (the release's three first)."""

LAYERS: dict[str, Layer] = {}
"""Registered label layers by key."""


def _names_of(entry) -> set[str]:
    names = {entry.key, *getattr(entry, "aliases", ())}
    return {n.lower() for n in names}


def register_modality(modality: Modality) -> Modality:
    """Add a modality to the registry; its key, aliases and Dataset names must be new.

    Raises ``ValueError`` when a key or alias is taken or a collection id of a catalog is already
    claimed by another modality (say which, and how to replace it: :func:`unregister_modality`).

    Examples
    --------
    >>> toy = Modality("toy", ("b1", "b2"), (1.0, 2.0), (1.0, 1.0), "uint16", 0, "DN", "a toy sensor")
    >>> register_modality(toy).variables
    ('toy_b1', 'toy_b2')
    >>> register_modality(toy)
    Traceback (most recent call last):
    ...
    ValueError: modality 'toy' is registered twice (names {'toy'} already taken by 'toy'); give it another key, or unregister_modality('toy') first to replace it
    >>> unregister_modality("toy").key
    'toy'
    """
    if not isinstance(modality, Modality):
        raise TypeError(f"register_modality takes a terrafm.sensors.Modality, got {type(modality).__name__}")
    for other in [*MODALITIES.values(), *LAYERS.values()]:
        clash = _names_of(modality) & _names_of(other)
        if clash:
            raise ValueError(
                f"modality {modality.key!r} is registered twice (names {clash} already taken by {other.key!r}); "
                f"give it another key, or unregister_modality({other.key!r}) first to replace it")
    _check_collections_unclaimed(modality)
    MODALITIES[modality.key] = modality
    return modality


def register_layer(layer: Layer) -> Layer:
    """Add a label layer (see :class:`Layer`); same uniqueness rules as :func:`register_modality`.

    Examples
    --------
    >>> register_layer(LAYERS["worldcover"])
    Traceback (most recent call last):
    ...
    ValueError: layer 'worldcover' is registered twice (name taken by 'worldcover')
    """
    for other in [*MODALITIES.values(), *LAYERS.values()]:
        if _names_of(layer) & _names_of(other):
            raise ValueError(f"layer {layer.key!r} is registered twice (name taken by {other.key!r})")
    _check_collections_unclaimed(layer)
    LAYERS[layer.key] = layer
    return layer


def _check_collections_unclaimed(entry) -> None:
    for other in [*MODALITIES.values(), *LAYERS.values()]:
        for catalog, collection in entry.collections.items():
            theirs = other.collections.get(catalog)
            if theirs is not None and theirs.id == collection.id:
                raise ValueError(f"collection {collection.id!r} of catalog {catalog!r} already carries "
                                 f"{other.key!r}; one collection maps to one modality")


def unregister_modality(key: str) -> Modality:
    """Remove a modality (or layer) from the registry and return it.

    Examples
    --------
    >>> unregister_modality("landsat")
    Traceback (most recent call last):
    ...
    KeyError: "no modality 'landsat' is registered; registered: ['s2_l2a', 's2_l1c', 's1']"
    """
    if key in MODALITIES:
        return MODALITIES.pop(key)
    if key in LAYERS:
        return LAYERS.pop(key)
    raise KeyError(f"no modality {key!r} is registered; registered: {list(MODALITIES)}")


def get_modality(key: "str | Modality") -> Modality:
    """Return the registered :class:`Modality` for ``key`` or one of its aliases.

    Raises
    ------
    KeyError
        For an unknown key, listing the registered ones.

    Examples
    --------
    >>> get_modality("sentinel-1-rtc").key
    's1'
    """
    if isinstance(key, Modality):
        return key
    lowered = str(key).lower()
    if lowered in MODALITIES:
        return MODALITIES[lowered]
    for spec in MODALITIES.values():
        if lowered in spec.aliases:
            return spec
    raise KeyError(f"unknown modality {key!r}; registered: {list(MODALITIES)} "
                   "(add one with terrafm.sensors.register_modality)")


def patch_valid(mask, patch_size: int = PATCH_SIZE):
    """The one pixel -> patch rule: a patch is valid when at least :data:`MIN_VALID_FRACTION` of
    its pixels are. ``mask``: bool ``(..., H, W)`` numpy array or torch tensor, H and W multiples
    of ``patch_size``; returns bool ``(..., H / p, W / p)`` of the same kind.

    Examples
    --------
    >>> m = np.zeros((4, 4), bool); m[:2, :] = True; m[2, 2] = True    # 2 x 2 patches
    >>> patch_valid(m, 2).tolist()
    [[True, True], [False, False]]
    """
    *lead, h, w = mask.shape
    grid = mask.reshape(*lead, h // patch_size, patch_size, w // patch_size, patch_size)
    if _is_torch(mask):
        return grid.float().mean(dim=(-3, -1)) >= MIN_VALID_FRACTION
    return grid.mean(axis=(-3, -1)) >= MIN_VALID_FRACTION


# =================================================================================================
# normalization
# =================================================================================================
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


def _check_channels(x: Any, spec: Modality, channel_axis: int) -> None:
    if x.ndim == 0:
        raise ValueError(f"{spec.key}: expected an array with a channel axis, got a scalar")
    n = x.shape[channel_axis]
    if n != spec.n_bands:
        raise ValueError(
            f"{spec.key}: expected {spec.n_bands} channels {list(spec.bands)} on axis "
            f"{channel_axis}, got {n}. Reorder or select the bands in this order, or use "
            "terrafm.sensors.fill_missing_bands for a product that lacks some bands."
        )


def normalize(x: Any, modality: "str | Modality", channel_axis: int = -3, inplace: bool = False):
    """Normalize stored values of one modality to the model's input scale.

    Parameters
    ----------
    x : numpy.ndarray or torch.Tensor
        Stored values (S2 DN, S1 linear power) with bands in registry order along
        ``channel_axis``. Integers are promoted to float32; float dtypes are kept.
    modality : str or Modality
        Modality key, alias or object.
    channel_axis : int, default -3
        Band axis: ``-3`` fits (C, H, W) and (B, C, H, W).
    inplace : bool, default False
        Overwrite ``x`` (a floating numpy array) instead of allocating: for large blocks.

    Returns
    -------
    Same type as ``x``: ``(v - (mu - 2 sigma)) / (4 sigma)`` with ``v`` in dB for S1.

    Examples
    --------
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


def denormalize(x: Any, modality: "str | Modality", channel_axis: int = -3):
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
        f"{list(spec.bands)}. Reorder them, e.g. ds[{list(spec.variables)}]."
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
            out[i] = spec.mean[i] if not spec.to_db else 10 ** (spec.mean[i] / 10)
            filled.append(band)
        else:
            out[i] = moved[j]
    return np.moveaxis(out, 0, channel_axis), filled


# =================================================================================================
# the release's modalities and layers
# =================================================================================================
_S2_COMMON_NAMES = {"B01": ("coastal",), "B02": ("blue",), "B03": ("green",), "B04": ("red",),
                    "B05": ("rededge1",), "B06": ("rededge2",), "B07": ("rededge3",), "B08": ("nir",),
                    "B8A": ("nir08", "nir narrow"), "B09": ("nir09",), "B11": ("swir16",), "B12": ("swir22",)}
_PC_S2 = {b: b for b in S2_BANDS}
_ES_S2 = {b: names[0] for b, names in _S2_COMMON_NAMES.items()}
_S2_OFFSET = BaselineOffset(dn=1000, property="s2:processing_baseline", since="04.00",
                            start=_dt.date(2022, 1, 25), name_pattern=r"_N(\d{2})(\d{2})_",
                            name_properties=("s2:product_uri",))
_S2_CONVENTIONS = "Planetary Computer: DN = reflectance x 10000; Earth Search L2A: DN = (reflectance + 0.1) x 10000"
_S2_PLAUSIBLE = Plausibility(
    dtypes=("uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64"),
    range=(0.0, 65535.0), typical=(100.0, 15000.0),
    mistakes=(UnitMistake("reflectance (0-1), not DN", -0.5, 2.0, 0.99,
                          "pass stored DN as terrafm.stac.load returns them (" + _S2_CONVENTIONS + "), e.g. "
                          "ds[v] = (ds[v] * 10000).round().clip(1, 65535).astype('uint16') for each band"),),
    dtype_fix="cast DN with ds[v].astype('uint16'); reflectance 0-1 becomes DN by (ds[v] * 10000).round()"
              ".astype('uint16'); 8-bit, boolean or complex arrays are not Sentinel-2 DN: reload them with "
              "terrafm.stac.load",
)
_SCL = QualityMask("SCL", invalid_classes=(0, 1, 3, 8, 9, 10),
                   description="Sentinel-2 scene classification (invalid: no data, saturated, cloud shadow, "
                               "medium/high cloud, cirrus)")

RELEASE_MODALITIES: tuple[str, ...] = ("s2_l2a", "s2_l1c", "s1")
"""The modalities of the released TerraFM checkpoint, in its order."""

register_modality(Modality(
    key="s2_l2a", bands=S2_BANDS,
    mean=(1033.9414, 1135.3391, 1382.2553, 1526.9789, 1883.3911, 2516.2726,
          2782.7811, 2829.3833, 2977.2936, 3004.2905, 2832.1983, 2186.6507),
    std=(2761.4226, 807.365, 919.6919, 1221.4198, 1265.8146, 1323.0764,
         1428.7845, 1459.0343, 1497.9797, 1577.071, 1738.6128, 1620.8854),
    dtype="uint16", nodata=0, units="DN",
    description="Sentinel-2 L2A surface reflectance (DN = reflectance x 10000)",
    aliases=("sentinel-2-l2a", "s2l2a", "l2a"),
    quality=_SCL, offset=_S2_OFFSET,
    collections={"planetary-computer": Collection("sentinel-2-l2a", _PC_S2, "SCL", 1e-4, 0.0),
                 "earth-search": Collection("sentinel-2-l2a", _ES_S2, "scl", 1e-4, -0.1)},
    band_aliases=_S2_COMMON_NAMES,
    product_hints={"s2:product_type": ("S2MSI2A",), "processing:level": ("L2A", "L2")},
    majortom=MajorTOM(("Core-S2L2A", "S2L2A"), S2_BANDS), cloud_cover="eo:cloud_cover",
    plausible=_S2_PLAUSIBLE,
))
register_modality(Modality(
    key="s2_l1c", bands=S2_BANDS,
    mean=(2153.94, 1937.191, 1885.8236, 1906.7263, 2096.8369, 2692.8083,
          3015.8569, 2930.3957, 3243.99, 1389.849, 2915.8289, 2186.0514),
    std=(581.6321, 619.9756, 714.7784, 1018.3657, 1021.4312, 1116.4055,
         1265.8559, 1234.6123, 1374.9582, 608.362, 1547.9093, 1336.0316),
    dtype="uint16", nodata=0, units="DN",
    description="Sentinel-2 L1C top-of-atmosphere reflectance (DN)",
    aliases=("sentinel-2-l1c", "s2l1c", "l1c"),
    offset=_S2_OFFSET,
    collections={"earth-search": Collection("sentinel-2-l1c", _ES_S2, None, 1e-4, 0.0)},
    band_aliases=_S2_COMMON_NAMES,
    product_hints={"s2:product_type": ("S2MSI1C",), "processing:level": ("L1C", "L1")},
    majortom=MajorTOM(("Core-S2L1C", "S2L1C"), S2_BANDS), cloud_cover="eo:cloud_cover",
    plausible=_S2_PLAUSIBLE,
))
register_modality(Modality(
    key="s1", bands=S1_BANDS, mean=(-12.7572, -19.6423), std=(5.8491, 5.8516),
    dtype="float32", nodata=-32768.0, units="linear power",
    description="Sentinel-1 RTC backscatter, linear power (VV, VH)",
    to_db=True, positive=True, paired=True,
    aliases=("sentinel-1-rtc", "s1rtc", "s1_rtc", "sar"),
    collections={"planetary-computer": Collection("sentinel-1-rtc", {"vv": "vv", "vh": "vh"})},
    band_aliases={"vv": ("VV",), "vh": ("VH",)},
    product_hints={"sar:product_type": ("GRD", "RTC")},
    majortom=MajorTOM(("Core-S1RTC", "S1RTC"), S1_BANDS),
    plausible=Plausibility(
        dtypes=("float32", "float64"), range=(0.0, 1e5), typical=(1e-4, 1.0),
        mistakes=(UnitMistake("dB", -100.0, 0.0, 0.5,
                              "pass linear power (10 ** (dB / 10)): ds[v] = 10 ** (ds[v] / 10) for s1_vv and s1_vh "
                              "(terrafm converts power to dB itself)"),
                  UnitMistake("scaled digital numbers, not calibrated linear power", 10.0, np.inf, 0.5,
                              "pass calibrated backscatter (gamma0 or sigma0) as linear power, as terrafm.stac.load "
                              "of sentinel-1-rtc returns it (typical values 0.001-0.5)")),
        dtype_fix="pass linear power as float32 (ds[v].astype('float32')); complex SLC values z become power "
                  "by abs(z) ** 2",
    ),
))
register_layer(Layer(
    key="worldcover", dtype="uint8", nodata=0, description="ESA WorldCover classes (0 = no data)",
    collections={"planetary-computer": Collection("esa-worldcover", {"worldcover": "map"})},
))
