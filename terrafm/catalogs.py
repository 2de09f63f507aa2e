"""The catalog registry, and how each STAC item is read: its modality, asset keys and signer.

A :class:`Catalog` is data: its endpoint, the signer its assets need, and the href hosts that
signer serves. How a catalog publishes each modality (collection id, asset keys) is part of the
modality in :mod:`terrafm.sensors`. :func:`terrafm.stac.search` stamps every item with its origin
(``terrafm:catalog`` and ``terrafm:api`` properties, kept through ``to_dict``/``from_dict``), so
:func:`resolve` needs no catalog argument, and items from several catalogs load together.

Resolution of one item, in order:

1. its origin: the ``terrafm:catalog`` property, else a known catalog whose URL its links name;
2. a registered :class:`~terrafm.sensors.Collection` of that catalog with the item's collection
   id, whose asset keys the item has (an item whose keys contradict its declared catalog is an
   error naming the convention they do match);
3. without a known origin: any registered collection with that id whose asset keys it has;
4. otherwise the item's own metadata: asset keys, ``eo:bands`` names and common names matched
   against each modality's bands and band aliases, ``raster:bands`` scale/offset, and the
   modality's product hints (``s2:product_type``, ``processing:level``) where several modalities
   share their bands;
5. else an error listing the asset keys found and the conventions known.

Examples
--------
>>> import pystac, datetime as dt
>>> item = pystac.Item("x", None, None, dt.datetime(2023, 6, 1), {"terrafm:catalog": "earth-search"},
...                    collection="sentinel-2-l1c")
>>> for band, key in sensors.MODALITIES["s2_l1c"].collections["earth-search"].assets.items():
...     item.add_asset(key, pystac.Asset(f"https://example.com/{key}.tif"))
>>> resolved = resolve(item)
>>> resolved.modality.key, resolved.assets["B8A"], resolved.catalog.name
('s2_l1c', 'nir08', 'earth-search')
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from . import sensors

logger = logging.getLogger(__name__)

__all__ = ["Catalog", "CATALOGS", "register_catalog", "get_catalog", "ResolvedItem", "resolve",
           "stamp_origin", "conventions", "ORIGIN_PROPERTY", "API_PROPERTY", "ConventionError"]

ORIGIN_PROPERTY = "terrafm:catalog"
"""Item property naming the catalog an item was found in (set by :func:`terrafm.stac.search`)."""
API_PROPERTY = "terrafm:api"
"""Item property holding the STAC API endpoint an item was found at."""


class ConventionError(ValueError):
    """An item whose modality or asset keys cannot be told, or contradict its declared catalog."""


def _planetary_computer_sign(href: str, refresh: bool = False) -> str:
    from .reading import pc_sign

    return pc_sign(href, refresh)


@dataclass(frozen=True)
class Catalog:
    """A STAC catalog terrafm knows by name.

    Attributes
    ----------
    name : str
    url : str
        STAC API endpoint.
    sign : callable, optional
        ``sign(href, refresh) -> href`` making an asset readable (Planetary Computer SAS tokens).
    signed_hosts : tuple of str
        Host name suffixes of the assets ``sign`` serves: an item of unknown origin whose assets
        live there is signed by this catalog's signer.
    """

    name: str
    url: str
    sign: Callable[[str, bool], str] | None = None
    signed_hosts: tuple[str, ...] = ()

    def serves(self, href: str) -> bool:
        host = urlsplit(href).hostname or ""
        return any(host.endswith(suffix) for suffix in self.signed_hosts)


CATALOGS: dict[str, Catalog] = {}
"""Registered catalogs by name."""


def register_catalog(catalog: Catalog) -> Catalog:
    """Add a catalog; its name must be new.

    Examples
    --------
    >>> register_catalog(Catalog("planetary-computer", "https://x"))
    Traceback (most recent call last):
    ...
    ValueError: catalog 'planetary-computer' is registered twice; pick another name
    """
    if catalog.name in CATALOGS:
        raise ValueError(f"catalog {catalog.name!r} is registered twice; pick another name")
    CATALOGS[catalog.name] = catalog
    return catalog


def get_catalog(name: str) -> Catalog:
    """The registered catalog ``name``, or an error listing them.

    Examples
    --------
    >>> get_catalog("earth-search").sign is None
    True
    """
    if name not in CATALOGS:
        raise ValueError(f"unknown catalog {name!r}; use one of {list(CATALOGS)} or url=... "
                         "(register others with terrafm.catalogs.register_catalog)")
    return CATALOGS[name]


register_catalog(Catalog("planetary-computer", "https://planetarycomputer.microsoft.com/api/stac/v1",
                         sign=_planetary_computer_sign, signed_hosts=(".blob.core.windows.net",)))
register_catalog(Catalog("earth-search", "https://earth-search.aws.element84.com/v1"))


# -------------------------------------------------------------------------------------------------
# one item
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedItem:
    """How to read one item: what it carries and under which asset keys.

    Attributes
    ----------
    modality : Modality or Layer
    assets : mapping
        Band name -> the item's asset key.
    mask : str or None
        Asset key of the modality's quality layer.
    catalog : Catalog or None
        Its origin, when known.
    sign : callable or None
        Signer its hrefs need.
    scale, offset : float
        From the convention or the item's ``raster:bands`` (informational).
    source : str
        How it was resolved (for messages).
    """

    modality: Any
    assets: Mapping[str, str]
    mask: str | None
    catalog: Catalog | None
    sign: Callable[[str, bool], str] | None
    scale: float = 1.0
    offset: float = 0.0
    source: str = field(default="", compare=False)


def stamp_origin(item, catalog: Catalog | None, endpoint: str) -> None:
    """Record where ``item`` was found (in its properties, so the record survives serialisation).

    Examples
    --------
    >>> import pystac, datetime as dt
    >>> item = pystac.Item("x", None, None, dt.datetime(2023, 6, 1), {})
    >>> stamp_origin(item, get_catalog("earth-search"), "https://mirror.example/v1")
    >>> item.properties
    {'terrafm:catalog': 'earth-search', 'terrafm:api': 'https://mirror.example/v1'}
    """
    if catalog is not None:
        item.properties[ORIGIN_PROPERTY] = catalog.name
    item.properties[API_PROPERTY] = endpoint


def _origin(item) -> Catalog | None:
    name = item.properties.get(ORIGIN_PROPERTY)
    if name:
        return get_catalog(name)
    hrefs = [link.get_target_str() for link in item.links if link.rel in ("root", "self", "collection")]
    for catalog in CATALOGS.values():
        base = catalog.url.rstrip("/")
        if any(h and h.startswith(base) for h in hrefs):
            return catalog
    return None


def _signer(item, catalog: Catalog | None):
    """The signer an item's hrefs need: its catalog's when that signs everything it serves, else
    the signer of any catalog whose hosts serve the item's assets, else none."""
    if catalog is not None and catalog.sign is not None and not catalog.signed_hosts:
        return catalog.sign
    hrefs = [a.href for a in item.assets.values()]
    for known in CATALOGS.values():
        if known.sign is not None and any(known.serves(h) for h in hrefs):
            return known.sign
    return None


def _entries():
    return [*sensors.MODALITIES.values(), *sensors.LAYERS.values()]


def _has_keys(item, collection) -> bool:
    return all(k in item.assets for k in collection.assets.values())


def _from_convention(item, entry, collection, catalog, source) -> ResolvedItem:
    mask = collection.mask if collection.mask in item.assets else None
    return ResolvedItem(entry, dict(collection.assets), mask, catalog, _signer(item, catalog),
                        collection.scale, collection.offset, source)


def conventions(collection_id: str) -> list:
    """``(catalog name, modality or layer, Collection)`` of every registered convention with this id.

    Examples
    --------
    >>> [(name, entry.key) for name, entry, _ in conventions("sentinel-2-l2a")]
    [('planetary-computer', 's2_l2a'), ('earth-search', 's2_l2a')]
    """
    return [(name, entry, c) for entry in _entries() for name, c in entry.collections.items() if c.id == collection_id]


def _describe_known() -> str:
    parts = []
    for entry in _entries():
        for name, c in entry.collections.items():
            keys = list(c.assets.values())
            parts.append(f"{name}/{c.id} -> {entry.key} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    return "; ".join(parts)


def resolve(item) -> ResolvedItem:
    """How to read ``item`` (see the module docstring for the order of rules).

    Raises
    ------
    ConventionError
        Asset keys contradicting the declared catalog, or no recognisable bands.

    Examples
    --------
    >>> import pystac, datetime as dt
    >>> item = pystac.Item("s1", None, None, dt.datetime(2023, 6, 1), {}, collection="sentinel-1-rtc")
    >>> for pol in ("vv", "vh"):
    ...     item.add_asset(pol, pystac.Asset(f"https://x.blob.core.windows.net/c/{pol}.tif"))
    >>> how = resolve(item)                      # origin unknown: by asset keys; signed: a blob host
    >>> how.modality.key, how.catalog, how.sign is not None
    ('s1', None, True)
    """
    catalog = _origin(item)
    known = conventions(item.collection_id)
    if catalog is not None:
        mine = [(e, c) for name, e, c in known if name == catalog.name]
        for entry, collection in mine:
            if _has_keys(item, collection):
                return _from_convention(item, entry, collection, catalog, f"{catalog.name}/{collection.id}")
        if mine:
            entry, collection = mine[0]
            missing = sorted(k for k in collection.assets.values() if k not in item.assets)
            others = [f"{name}/{c.id}" for name, e, c in conventions(item.collection_id) if _has_keys(item, c)]
            raise ConventionError(
                f"item {item.id} is declared as from catalog {catalog.name!r}, but lacks that catalog's asset keys "
                f"{missing} for {collection.id!r} (it has {sorted(item.assets)})"
                + (f"; its keys follow the {others} convention" if others else "")
                + f". Fix the item's {ORIGIN_PROPERTY!r} property (or search with the catalog it came from), "
                  "or drop such items.")
    for name, entry, collection in known:
        if _has_keys(item, collection):
            return _from_convention(item, entry, collection, catalog, f"{name}/{collection.id} (by asset keys)")
    return _from_metadata(item, catalog)


# -------------------------------------------------------------------------------------------------
# items of collections no table knows: read their own metadata
# -------------------------------------------------------------------------------------------------
def _asset_names(key: str, asset) -> set[str]:
    names = {key.lower()}
    for band in asset.extra_fields.get("eo:bands") or []:
        for field_name in ("name", "common_name"):
            if band.get(field_name):
                names.add(str(band[field_name]).lower())
    return names


def _match_bands(item, entry) -> dict[str, str] | None:
    """Band -> asset key for every band of ``entry``, or None if some band has no unique asset."""
    data = {k: a for k, a in item.assets.items() if not a.roles or "data" in a.roles or "reflectance" in a.roles}
    names = {k: _asset_names(k, a) for k, a in data.items()}
    out = {}
    for band in entry.bands:
        wanted = {band.lower(), *(a.lower() for a in getattr(entry, "band_aliases", {}).get(band, ()))}
        exact = [k for k in names if k.lower() == band.lower()]
        hits = exact or [k for k, n in names.items() if n & wanted]
        if len(hits) != 1:
            return None
        out[band] = hits[0]
    return out if len(set(out.values())) == len(out) else None


def _hint_score(item, entry) -> int:
    hints = getattr(entry, "product_hints", {})
    props = item.properties
    score = sum(1 for prop, values in hints.items() if str(props.get(prop, "")).upper() in {v.upper() for v in values})
    tokens = item.collection_id.lower().replace("_", "-") if item.collection_id else ""
    score += any(alias in tokens for alias in getattr(entry, "aliases", ()) if len(alias) >= 3 and "-" not in alias)
    return score


def _from_metadata(item, catalog: Catalog | None) -> ResolvedItem:
    matches = [(entry, assets) for entry in sensors.MODALITIES.values() if (assets := _match_bands(item, entry))]
    if len(matches) > 1:
        scores = [_hint_score(item, entry) for entry, _ in matches]
        best = max(scores)
        matches = [m for m, s in zip(matches, scores) if s == best and s > 0] or matches
    if len(matches) != 1:
        found = sorted(item.assets)
        why = (f"its bands fit {[e.key for e, _ in matches]} equally and no product hint "
               f"({', '.join(sorted({p for e, _ in matches for p in e.product_hints}))}) tells them apart"
               if matches else "no registered modality's bands are recognisable in its asset keys or eo:bands")
        raise ConventionError(
            f"item {item.id} of collection {item.collection_id!r} cannot be read: {why}. Asset keys found: {found}. "
            f"Known conventions: {_describe_known()}. Register the collection on its modality "
            "(terrafm.sensors.Collection in Modality.collections) or give the assets the band names.")
    entry, assets = matches[0]
    quality = getattr(entry, "quality", None)
    mask = None
    if quality is not None:
        mask = next((k for k in item.assets if k.lower() == quality.name.lower()), None)
    raster = (item.assets[assets[entry.bands[0]]].extra_fields.get("raster:bands") or [{}])[0]
    logger.info("item %s: collection %r read as %s from its own metadata", item.id, item.collection_id, entry.key)
    return ResolvedItem(entry, assets, mask, catalog, _signer(item, catalog),
                        float(raster.get("scale", 1.0)), float(raster.get("offset", 0.0)), "item metadata")
