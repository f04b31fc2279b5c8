"""Acquisition dates of scenes: given by the user, else from file tags or names, else order.

Tags tried, in GDAL's metadata domains: ``TIFFTAG_DATETIME`` (``YYYY:MM:DD HH:MM:SS``, the
TIFF DateTime tag, which many processors set to the acquisition time),
``ACQUISITIONDATETIME`` (the ``IMAGERY`` domain GDAL fills from Maxar/DigitalGlobe, Pleiades,
SPOT and Landsat metadata), and ``DATE_ACQUIRED`` / ``SENSING_TIME`` / ``DATETIME``. Names:
the first ``YYYY-MM-DD``, ``YYYY_MM_DD`` or ``YYYYMMDD`` that is a real date (Sentinel-2,
Landsat and most archives name files that way).
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import rasterio

from geodino.errors import InputError

_TAGS = ("TIFFTAG_DATETIME", "ACQUISITIONDATETIME", "DATE_ACQUIRED", "SENSING_TIME", "DATETIME")
_DOMAINS = (None, "IMAGERY")
_IN_TEXT = re.compile(r"(?<!\d)((?:19|20)\d\d)[-_:]?(0[1-9]|1[0-2])[-_:]?(0[1-9]|[12]\d|3[01])(?!\d)")


@dataclass(frozen=True)
class SceneDate:
    """A scene's date label (ISO date, or ``date N`` when unknown) and where it came from."""

    label: str
    source: str  # "option", "tag NAME", "file name" or "scene order"

    @property
    def date(self) -> dt.date | None:
        try:
            return dt.date.fromisoformat(self.label)
        except ValueError:
            return None


def parse_date(text: str) -> dt.date | None:
    """The first plausible calendar date in ``text`` (tag value or file name), or None."""
    for match in _IN_TEXT.finditer(str(text)):
        try:
            return dt.date(*(int(g) for g in match.groups()))
        except ValueError:
            continue
    return None


def _from_tags(path: str) -> tuple[dt.date, str] | None:
    try:
        with rasterio.open(path) as src:
            for domain in _DOMAINS:
                tags = src.tags(ns=domain) if domain else src.tags()
                for name in _TAGS:
                    if name in tags:
                        found = parse_date(tags[name])
                        if found is not None:
                            return found, f"tag {name}"
    except rasterio.errors.RasterioError:
        return None
    return None


def scene_dates(paths: Sequence[str], given: Sequence[str] | None = None) -> list[SceneDate]:
    """One date per scene: ``given`` (ISO dates, one per scene), else tags, else file name, else order."""
    if given is not None:
        if len(given) != len(paths):
            raise InputError(f"--dates has {len(given)} dates for {len(paths)} scenes; give one per scene")
        out = []
        for text in given:
            try:
                out.append(SceneDate(dt.date.fromisoformat(text.strip()).isoformat(), "option"))
            except ValueError:
                raise InputError(f"--dates: {text!r} is not an ISO date (YYYY-MM-DD)") from None
        return out
    out = []
    for i, path in enumerate(paths):
        tagged = _from_tags(path)
        if tagged is not None:
            out.append(SceneDate(tagged[0].isoformat(), tagged[1]))
            continue
        named = parse_date(Path(path).name)
        out.append(SceneDate(named.isoformat(), "file name") if named else SceneDate(f"date {i + 1}", "scene order"))
    return out


def order_warning(dates: Sequence[SceneDate]) -> str | None:
    """A warning when known dates go backwards (scenes are compared in the order given)."""
    known = [d.date for d in dates]
    if all(k is not None for k in known) and any(b < a for a, b in itertools.pairwise(known)):
        return ("the scenes are not in date order (" + ", ".join(d.label for d in dates) + "); changes are "
                "computed in the order given, so a later-to-earlier step has its signs reversed")
    return None


__all__ = ["SceneDate", "order_warning", "parse_date", "scene_dates"]
