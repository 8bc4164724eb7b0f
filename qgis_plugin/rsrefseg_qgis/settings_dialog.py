"""Raster > RSRefSeg > Settings: environment, default checkpoint, device and precision."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from qgis.gui import QgsFileWidget
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QApplication,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from . import settings
from .runner import RSRefSegNotFound, child_env, format_command, resolve_command


class SettingsDialog(QDialog):
    """Edits the ``rsrefseg/*`` QgsSettings (see :mod:`settings`)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("RSRefSeg settings")
        self.setMinimumWidth(620)
        form = QFormLayout()

        self.environment = QLineEdit(settings.value(settings.KEY_ENVIRONMENT))
        self.environment.setPlaceholderText(shutil.which("rsrefseg") or "folder of the Python environment")
        self.environment.setToolTip(
            "The Python environment where rsrefseg is installed (its folder, e.g. ~/rsrefseg/.venv), or its "
            "rsrefseg executable or its python. Empty: the rsrefseg found on PATH.")
        folder_button, file_button = QPushButton("Folder…"), QPushButton("File…")
        folder_button.clicked.connect(self._pick_folder)
        file_button.clicked.connect(self._pick_file)
        row = QHBoxLayout()
        row.addWidget(self.environment, 1)
        row.addWidget(folder_button)
        row.addWidget(file_button)
        form.addRow("rsrefseg environment", row)

        test_button = QPushButton("Test")
        test_button.clicked.connect(self._test)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        test_row = QHBoxLayout()
        test_row.addWidget(test_button)
        test_row.addWidget(self.status, 1)
        form.addRow("", test_row)

        self.checkpoint = QgsFileWidget()
        self.checkpoint.setStorageMode(QgsFileWidget.GetDirectory)
        self.checkpoint.setFilePath(settings.value(settings.KEY_CHECKPOINT))
        self.checkpoint.setToolTip("Default checkpoint folder (config.json + model.safetensors) of the algorithms")
        form.addRow("Default checkpoint", self.checkpoint)

        self.device = QComboBox()
        self.device.setEditable(True)
        self.device.addItems(list(settings.DEVICES))
        self.device.setCurrentText(settings.value(settings.KEY_DEVICE))
        self.device.setToolTip("torch device: cpu, cuda, cuda:1, mps; empty: CUDA when available, else CPU")
        form.addRow("Device", self.device)

        self.precision = QComboBox()
        self.precision.addItems(list(settings.PRECISIONS))
        self.precision.setCurrentText(settings.value(settings.KEY_PRECISION, "fp32"))
        self.precision.setToolTip("bf16 is faster on GPUs and CPUs with AVX-512 BF16/AMX")
        form.addRow("Precision", self.precision)

        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(buttons)

    def _pick_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Python environment of rsrefseg", self.environment.text())
        if path:
            self.environment.setText(path)

    def _pick_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "rsrefseg executable or python", self.environment.text())
        if path:
            self.environment.setText(path)

    def _test(self) -> None:
        """Run ``rsrefseg --version`` with the typed environment and show the answer."""
        try:
            command = resolve_command(self.environment.text())
        except RSRefSegNotFound as exc:
            self.status.setText(str(exc))
            return
        QApplication.setOverrideCursor(Qt.WaitCursor)
        try:
            done = subprocess.run([*command, "--version"], capture_output=True, text=True, env=child_env(),
                                  timeout=120, stdin=subprocess.DEVNULL)
            answer = (done.stdout or done.stderr).strip().splitlines()
            text = answer[-1] if answer else f"exit status {done.returncode}"
            self.status.setText(f"{format_command(command)}: {text}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.status.setText(f"{format_command(command)}: cannot run ({exc})")
        finally:
            QApplication.restoreOverrideCursor()

    def accept(self) -> None:
        settings.set_value(settings.KEY_ENVIRONMENT, self.environment.text().strip())
        settings.set_value(settings.KEY_CHECKPOINT, self.checkpoint.filePath().strip())
        settings.set_value(settings.KEY_DEVICE, self.device.currentText().strip())
        settings.set_value(settings.KEY_PRECISION, self.precision.currentText())
        super().accept()

    def values(self) -> dict[str, Any]:
        """The values shown (for tests)."""
        return {"environment": self.environment.text(), "checkpoint": self.checkpoint.filePath(),
                "device": self.device.currentText(), "precision": self.precision.currentText()}
