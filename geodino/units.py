"""Ground units of a raster grid: how many metres one unit of a projected CRS is.

Areas in geodino's outputs are in m² (km² in reports) whatever the CRS's unit: US State
Plane grids are in US survey feet (0.3048006 m), some national grids in international feet.
A pixel of 2 x 2 ft is 0.37 m², not 4 m². Geographic CRSs have no single pixel area;
callers that need one estimate a UTM zone or report none.
"""

from __future__ import annotations

import rasterio.errors


def metres_per_unit(crs) -> float | None:
    """Metres in one linear unit of ``crs`` (a rasterio CRS, projected or a local engineering
    one); None if geographic or absent."""
    if crs is None or crs.is_geographic:
        return None
    try:
        _, factor = crs.linear_units_factor
    except rasterio.errors.CRSError:  # a projected CRS without a declared unit: metres, as GDAL assumes
        return 1.0
    return float(factor)


def pixel_area_m2(crs, transform) -> float | None:
    """Ground area of one pixel of the grid (``transform`` an Affine) in m²; None if geographic or absent."""
    factor = metres_per_unit(crs)
    if factor is None:
        return None
    return abs(transform.a * transform.e - transform.b * transform.d) * factor * factor


__all__ = ["metres_per_unit", "pixel_area_m2"]
