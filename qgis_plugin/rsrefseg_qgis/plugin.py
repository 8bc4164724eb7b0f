"""The plugin object QGIS loads: the Processing provider, menu entries, errors in the message bar."""

from __future__ import annotations

from typing import Any

from qgis.core import Qgis, QgsApplication
from qgis.PyQt.QtCore import QObject, pyqtSignal
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from .algorithms.base import LOG_TAG
from .provider import ICON, RSRefSegProvider

MENU = "&RSRefSeg"


class ErrorRelay(QObject):
    """Shows the plugin's critical log messages (the CLI's ``error:`` lines) in the message bar.

    Algorithms run in a worker thread and only log; ``show`` is emitted from that thread and
    delivered in the GUI thread, where the message bar lives.
    """

    show = pyqtSignal(str)

    def __init__(self, iface: Any) -> None:
        super().__init__()
        self.iface = iface
        self.show.connect(self._push)

    def on_message(self, message: str, tag: str, level: Any) -> None:
        if tag == LOG_TAG and level == Qgis.Critical:
            self.show.emit(message)

    def _push(self, message: str) -> None:
        self.iface.messageBar().pushMessage("RSRefSeg", message, Qgis.Critical, 15)


class RSRefSegPlugin:
    """Registers the "RSRefSeg" Processing provider and the Raster > RSRefSeg menu."""

    def __init__(self, iface: Any) -> None:
        self.iface = iface
        self.provider: RSRefSegProvider | None = None
        self.actions: list[QAction] = []
        self.relay: ErrorRelay | None = None

    def initProcessing(self) -> None:
        """Add the provider (also called by qgis_process, without a GUI)."""
        if self.provider is None:
            self.provider = RSRefSegProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:
        self.initProcessing()
        window = self.iface.mainWindow()
        segment = QAction(QIcon(str(ICON)), "Segment by expression…", window)
        segment.triggered.connect(lambda: self.open_algorithm("rsrefseg:segment"))
        encode = QAction("Encode scene features…", window)
        encode.triggered.connect(lambda: self.open_algorithm("rsrefseg:encode"))
        from_features = QAction("Segment from features…", window)
        from_features.triggered.connect(lambda: self.open_algorithm("rsrefseg:segment_features"))
        settings = QAction("Settings…", window)
        settings.triggered.connect(self.open_settings)
        for action in (segment, encode, from_features, settings):
            self.iface.addPluginToRasterMenu(MENU, action)
            self.actions.append(action)
        self.iface.addRasterToolBarIcon(segment)
        self.relay = ErrorRelay(self.iface)
        QgsApplication.messageLog().messageReceived.connect(self.relay.on_message)

    def unload(self) -> None:
        if self.relay is not None:
            try:
                QgsApplication.messageLog().messageReceived.disconnect(self.relay.on_message)
            except (TypeError, RuntimeError):
                pass
            self.relay = None
        for action in self.actions:
            self.iface.removePluginRasterMenu(MENU, action)
            self.iface.removeRasterToolBarIcon(action)
        self.actions = []
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None

    def open_algorithm(self, algorithm_id: str) -> None:
        """The Processing dialog of an algorithm (it runs in the background; the window stays usable)."""
        import processing

        processing.execAlgorithmDialog(algorithm_id, {})

    def open_settings(self) -> None:
        from .settings_dialog import SettingsDialog

        SettingsDialog(self.iface.mainWindow()).exec_()
