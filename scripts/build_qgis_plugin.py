"""Build the installable QGIS plugin zip (``make qgis-plugin``): ``dist/rsrefseg_qgis.zip`` holding the
folder ``rsrefseg_qgis/`` at its top level (Plugins > Manage and Install Plugins > Install from ZIP).

Standard library only (no venv needed). Compiled files and caches are left out; entries are sorted
and dated 1980-01-01 so the same sources give the same zip.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "qgis_plugin" / "rsrefseg_qgis"
SKIP_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache"}
SKIP_SUFFIXES = {".pyc", ".pyo"}


def plugin_files(folder: Path = PLUGIN) -> list[Path]:
    """The files that go into the zip, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not SKIP_PARTS & set(p.relative_to(folder).parts)
                  and p.suffix not in SKIP_SUFFIXES)


def build(out: Path, folder: Path = PLUGIN) -> Path:
    """Write the zip to ``out`` (through a temporary file) and return its path."""
    if not (folder / "metadata.txt").is_file():
        raise SystemExit(f"error: {folder}: no metadata.txt, not a QGIS plugin folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    with zipfile.ZipFile(part, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in plugin_files(folder):
            name = f"{folder.name}/{path.relative_to(folder).as_posix()}"
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes())
    part.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "dist" / "rsrefseg_qgis.zip", help="zip to write")
    args = parser.parse_args(argv)
    path = build(args.out)
    print(f"{path} ({len(plugin_files())} files); install it in QGIS: Plugins > Manage and Install Plugins > "
          "Install from ZIP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
