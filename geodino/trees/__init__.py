"""Individual trees from a canopy-height raster: tree tops, crown polygons and a crown-id raster.

``geodino.crowns(path, out)`` (:func:`geodino.trees.scene.crowns`) runs the whole method on
a raster of any size; the stages are importable on their own: :mod:`~geodino.trees.tops`
(variable-window local maxima), :mod:`~geodino.trees.segment` (marker-controlled watershed),
:mod:`~geodino.trees.match` (scoring against reference trees).
"""

from geodino.trees.params import CrownParams
from geodino.trees.scene import CrownResult, crowns

__all__ = ["CrownParams", "CrownResult", "crowns"]
