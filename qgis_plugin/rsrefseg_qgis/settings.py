"""The plugin's settings, kept in ``QgsSettings`` under ``rsrefseg/``.

- ``rsrefseg/environment``: the Python environment folder where rsrefseg is installed, its
  ``rsrefseg`` executable or its Python (empty: ``rsrefseg`` found on PATH);
- ``rsrefseg/checkpoint``: default checkpoint folder of the algorithms;
- ``rsrefseg/device``: torch device passed as ``--device`` (empty: the CLI's default);
- ``rsrefseg/precision``: ``fp32`` or ``bf16`` (``--precision``).
"""

from __future__ import annotations

from qgis.core import QgsSettings

from .runner import resolve_command

KEY_ENVIRONMENT = "rsrefseg/environment"
KEY_CHECKPOINT = "rsrefseg/checkpoint"
KEY_DEVICE = "rsrefseg/device"
KEY_PRECISION = "rsrefseg/precision"

#: Precisions of ``rsrefseg --precision``.
PRECISIONS = ("fp32", "bf16")
#: Devices offered in the settings dialog (the field is editable: ``cuda:1`` etc. work too).
DEVICES = ("", "cpu", "cuda", "mps")


def value(key: str, default: str = "") -> str:
    """A setting as text."""
    text = QgsSettings().value(key, default, type=str)
    return str(text or default)


def set_value(key: str, text: str) -> None:
    """Store a setting."""
    QgsSettings().setValue(key, text)


def command() -> list[str]:
    """The argv prefix running rsrefseg (see :func:`runner.resolve_command`)."""
    return resolve_command(value(KEY_ENVIRONMENT))


def model_args(device: str = "", precision: str = "") -> list[str]:
    """``--device`` / ``--precision`` from the given values, else from the settings."""
    args = []
    device = (device or value(KEY_DEVICE)).strip()
    if device:
        args += ["--device", device]
    precision = (precision or value(KEY_PRECISION, "fp32")).strip()
    if precision in PRECISIONS:
        args += ["--precision", precision]
    return args
