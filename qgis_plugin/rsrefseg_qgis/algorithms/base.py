"""What the RSRefSeg algorithms share: parameters, running the CLI, reporting its errors."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qgis.core import (
    Qgis,
    QgsMessageLog,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingParameterBand,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterString,
    QgsProcessingUtils,
    QgsProviderRegistry,
    QgsRasterLayer,
)
from qgis.PyQt.QtCore import QCoreApplication

from .. import settings
from ..clip import ClipError
from ..layers import OutputError
from ..results import SummaryError
from ..runner import Cancelled, CliFailed, CliResult, RSRefSegNotFound, check, command_help, run_cli

#: Tag of the plugin's messages in QGIS's log (the plugin shows its critical ones in the message bar).
LOG_TAG = "RSRefSeg"
#: Choices of the PRECISION parameter (the first one: the plugin setting).
PRECISION_CHOICES = ("settings default", "fp32", "bf16")
#: Exceptions that become a one-line Processing error (no traceback).
USER_ERRORS = (RSRefSegNotFound, CliFailed, SummaryError, ClipError, OutputError)


def tr(text: str) -> str:
    """Translatable text."""
    return QCoreApplication.translate("RSRefSeg", text)


def log_error(message: str) -> None:
    """Put ``message`` in QGIS's log (tab RSRefSeg) as critical; the plugin relays it to the message bar."""
    QgsMessageLog.logMessage(message, LOG_TAG, Qgis.Critical)


def parse_expressions(text: str) -> list[str]:
    """Non-blank lines of the EXPRESSIONS text, whitespace collapsed."""
    return [" ".join(line.split()) for line in (text or "").splitlines() if line.strip()]


class RSRefSegAlgorithm(QgsProcessingAlgorithm):
    """Base class: parameter helpers and :meth:`run_rsrefseg` (CLI subprocess with progress/cancel)."""

    CHECKPOINT, DEVICE, PRECISION = "CHECKPOINT", "DEVICE", "PRECISION"

    def createInstance(self) -> RSRefSegAlgorithm:
        return type(self)()

    # parameters ------------------------------------------------------------------------------
    def add_checkpoint_parameter(self) -> None:
        """CHECKPOINT: a folder, its default from the settings."""
        default = settings.value(settings.KEY_CHECKPOINT) or None
        self.addParameter(QgsProcessingParameterFile(
            self.CHECKPOINT, tr("Checkpoint folder (empty: the default of Raster > RSRefSeg > Settings)"),
            behavior=QgsProcessingParameterFile.Folder, defaultValue=default, optional=True))

    def add_model_parameters(self) -> None:
        """DEVICE and PRECISION as advanced parameters (empty: the settings)."""
        device = QgsProcessingParameterString(self.DEVICE, tr("Device (cpu, cuda, mps; empty: the setting)"),
                                              defaultValue="", optional=True)
        precision = QgsProcessingParameterEnum(self.PRECISION, tr("Precision"), options=list(PRECISION_CHOICES),
                                               defaultValue=0)
        for param in (device, precision):
            param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(param)

    def add_bands_parameter(self, name: str, layer_parameter: str) -> None:
        """The optional 1-or-3 band choice of ``layer_parameter`` (passed on as ``--bands``)."""
        self.addParameter(QgsProcessingParameterBand(
            name, tr("Bands (1 or 3, as red, green, blue; empty: default)"), None, layer_parameter,
            optional=True, allowMultiple=True))

    def valid_raster_layer(self, parameters: dict[str, Any], name: str, context: Any) -> Any:
        """The raster layer of parameter ``name``; QgsProcessingException when it is missing or invalid."""
        layer = self.parameterAsRasterLayer(parameters, name, context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException(self.invalidRasterError(parameters, name))
        return layer

    def checkpoint(self, parameters: dict[str, Any], context: Any) -> str:
        """The checkpoint folder (parameter, else setting). Raises QgsProcessingException when none."""
        path = self.parameterAsFile(parameters, self.CHECKPOINT, context) or settings.value(settings.KEY_CHECKPOINT)
        if not path:
            raise QgsProcessingException(tr("No checkpoint: choose a checkpoint folder or set the default one "
                                            "in Raster > RSRefSeg > Settings"))
        return path

    def model_args(self, parameters: dict[str, Any], context: Any) -> list[str]:
        """``--device`` / ``--precision`` from the advanced parameters or the settings."""
        device = self.parameterAsString(parameters, self.DEVICE, context) if self.DEVICE in parameters else ""
        choice = self.parameterAsEnum(parameters, self.PRECISION, context) if self.PRECISION in parameters else 0
        return settings.model_args(device, PRECISION_CHOICES[choice] if choice else "")

    # running ---------------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The argv prefix of the configured rsrefseg."""
        return settings.command()

    def supports(self, subcommand: str, option: str) -> bool:
        """Whether ``rsrefseg <subcommand>`` has ``option`` (from its ``--help``, cached)."""
        return option in command_help(self.command(), subcommand)

    def run_rsrefseg(self, args: list[str], feedback: Any) -> CliResult:
        """Run ``rsrefseg ARGS`` with progress and cancellation; raise on failure (CLI's error text)."""
        argv = [*self.command(), *args]
        try:
            result = run_cli(argv, feedback)
        except Cancelled:
            feedback.pushInfo(tr("Cancelled: rsrefseg was stopped and no output was written"))
            raise
        check(result)
        return result

    def work_folder(self) -> Path:
        """A new temporary folder in Processing's temporary folder (the caller removes it)."""
        return Path(tempfile.mkdtemp(prefix="rsrefseg-", dir=QgsProcessingUtils.tempFolder()))

    def processAlgorithm(self, parameters: dict[str, Any], context: Any, feedback: Any) -> dict[str, Any]:
        """Run :meth:`process`; user errors become a one-line QgsProcessingException, logged too."""
        work = self.work_folder()
        try:
            return self.process(parameters, context, feedback, work)
        except Cancelled:
            raise QgsProcessingException(tr("Cancelled by the user; no output was written")) from None
        except USER_ERRORS as exc:
            log_error(str(exc))
            raise QgsProcessingException(str(exc)) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def process(self, parameters: dict[str, Any], context: Any, feedback: Any, work: Path) -> dict[str, Any]:
        """The algorithm's work, in ``work`` (removed afterwards)."""
        raise NotImplementedError


def raster_file(layer: QgsRasterLayer, work: Path) -> tuple[str, bool]:
    """A path the CLI can read for ``layer``: its file, or a VRT of its GDAL source written in ``work``.

    Returns ``(path, is_original_file)``. Raises ClipError for layers not read by GDAL.
    """
    from osgeo import gdal

    if layer.providerType() != "gdal":
        raise ClipError(f"{layer.name()}: only rasters read by GDAL can be segmented "
                        f"(this layer comes from the {layer.providerType()} provider)")
    parts = QgsProviderRegistry.instance().decodeUri("gdal", layer.source())
    path = parts.get("path") or layer.source()
    if os.path.isfile(path) and not parts.get("layerName") and not parts.get("openOptions"):
        return path, True
    vrt = work / "source.vrt"
    if gdal.Translate(str(vrt), layer.source(), format="VRT") is None:
        raise ClipError(f"{layer.source()}: GDAL cannot read this raster ({gdal.GetLastErrorMsg()})")
    return str(vrt), False
