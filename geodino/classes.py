"""Class tables: codes, names and colours stored with land-cover rasters and heads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LandCoverClass:
    code: int
    name: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class ClassTable:
    """An ordered set of classes; the order is the head's channel order."""

    classes: tuple[LandCoverClass, ...]
    nodata: int = 0

    def __post_init__(self) -> None:
        codes = [c.code for c in self.classes]
        if len(set(codes)) != len(codes):
            raise ValueError(f"duplicate class codes in {codes}")
        if self.nodata in codes:
            raise ValueError(f"nodata value {self.nodata} is also a class code")
        if any(not 0 <= c <= 255 for c in codes):
            raise ValueError("class codes must fit in uint8 (0-255)")

    @property
    def codes(self) -> list[int]:
        return [c.code for c in self.classes]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def __len__(self) -> int:
        return len(self.classes)

    def name_of(self, code: int) -> str:
        for c in self.classes:
            if c.code == code:
                return c.name
        raise KeyError(code)

    def colormap(self) -> dict[int, tuple[int, int, int, int]]:
        """A GDAL colour table: every class code plus a transparent nodata entry."""
        cmap = {self.nodata: (0, 0, 0, 0)}
        cmap.update({c.code: (*c.color, 255) for c in self.classes})
        return cmap

    def to_dict(self) -> dict:
        return {
            "nodata": self.nodata,
            "classes": [{"code": c.code, "name": c.name, "color": list(c.color)} for c in self.classes],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ClassTable":
        return cls(
            classes=tuple(
                LandCoverClass(int(c["code"]), str(c["name"]), tuple(int(v) for v in c["color"]))
                for c in data["classes"]
            ),
            nodata=int(data.get("nodata", 0)),
        )


# Codes, names and colours of the ESA WorldCover 10 m legend, restricted to the classes the
# synthetic generator draws.
WORLDCOVER = ClassTable(
    classes=(
        LandCoverClass(10, "Tree cover", (0, 100, 0)),
        LandCoverClass(20, "Shrubland", (255, 187, 34)),
        LandCoverClass(30, "Grassland", (255, 255, 76)),
        LandCoverClass(40, "Cropland", (240, 150, 255)),
        LandCoverClass(50, "Built-up", (250, 0, 0)),
        LandCoverClass(60, "Bare / sparse vegetation", (180, 180, 180)),
        LandCoverClass(80, "Permanent water bodies", (0, 100, 200)),
    )
)
