"""The Processing provider "RSRefSeg"."""

from __future__ import annotations

from pathlib import Path

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .algorithms import ALGORITHMS

ICON = Path(__file__).with_name("icon.svg")


class RSRefSegProvider(QgsProcessingProvider):
    """Algorithms that run the rsrefseg command of a configured Python environment."""

    def id(self) -> str:
        return "rsrefseg"

    def name(self) -> str:
        return "RSRefSeg"

    def longName(self) -> str:
        return "RSRefSeg referring segmentation"

    def icon(self) -> QIcon:
        return QIcon(str(ICON))

    def loadAlgorithms(self) -> None:
        for algorithm in ALGORITHMS:
            self.addAlgorithm(algorithm())

    def supportsNonFileBasedOutput(self) -> bool:
        """Temporary outputs are files (a GeoPackage, a GeoTIFF), not memory layers."""
        return False

    def defaultVectorFileExtension(self, hasGeometry: bool = True) -> str:
        return "gpkg"

    def defaultRasterFileExtension(self) -> str:
        return "tif"
