"""Local packages shipped from the Manager to every Worker (ChimeraPy's ``send_packages``).

A package is given as ``{"name": its import name, "path": its folder or .py
file}``, typically one in development that the Workers cannot install. The
Manager zips it once (:func:`pack`); each Worker downloads the zip over HTTP,
checks its SHA-256 and extracts it into a folder of its own (:func:`extract`)
that it and its nodes import from.
"""

from __future__ import annotations

import hashlib
import io
import keyword
import logging
import os
import shutil
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = ["Package", "extract", "pack"]

log = logging.getLogger("chimera.manager")

#: Folders not shipped.
_SKIPPED = frozenset({"__pycache__", ".git", ".mypy_cache", ".pytest_cache", ".ruff_cache"})


@dataclass(frozen=True)
class Package:
    """One package, zipped: its import name, the zip, and the zip's SHA-256 (hex)."""

    name: str
    data: bytes
    sha256: str


def _check_name(name: Any) -> None:
    """Raise ValueError unless *name* can be a package's import name here."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"package name {name!r} is not a Python identifier")
    if name in sys.stdlib_module_names:
        raise ValueError(
            f"package name {name!r} is a module of Python's standard library: shipped, it "
            "would replace that module for the Worker and its nodes"
        )


def pack(meta: Mapping[str, Any]) -> Package:
    """Zip the package *meta* names: ``{"name": ..., "path": ...}``.

    A folder goes in as ``NAME/...`` (without ``__pycache__`` and tool
    caches; what symbolic links point to, as files and folders of their
    own); a ``.py`` file as ``NAME.py``. Blocking: run it in a thread.

    Raises:
        ValueError: *meta* lacks ``name`` or ``path``, the name is not a
            Python identifier (or is a keyword, or names a module of the
            standard library), the path is neither a folder nor a ``.py``
            file, or a link in the folder leads back into it (a loop).
    """
    if not isinstance(meta, Mapping) or "name" not in meta or "path" not in meta:
        raise ValueError(f'a package is {{"name": ..., "path": ...}}, not {meta!r}')
    name, path = meta["name"], Path(meta["path"])
    _check_name(name)
    own = path.resolve().stem if path.suffix == ".py" else path.resolve().name
    if own != name and path.exists():
        log.warning(
            "package %r: its path %s is %r: nodes import it as %r (is the name right?)",
            name,
            path,
            own,
            name,
        )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        if path.is_dir():
            # The folders (resolved) each folder walked is in: a link to one of
            # them would make the walk endless.
            within: dict[str, frozenset[Path]] = {str(path): frozenset()}
            for folder, subfolders, files in os.walk(path, followlinks=True):
                subfolders[:] = sorted(d for d in subfolders if d not in _SKIPPED)
                above = within.pop(folder) | {Path(folder).resolve()}
                for subfolder in subfolders:
                    inside = os.path.join(folder, subfolder)
                    if Path(inside).resolve() in above:
                        raise ValueError(
                            f"package {name!r}: {inside!r} links to a folder it is in (a loop)"
                        )
                    within[inside] = above
                for file in sorted(files):
                    full = Path(folder, file)
                    archive.write(full, PurePosixPath(name, *full.relative_to(path).parts))
        elif path.is_file() and path.suffix == ".py":
            archive.write(path, f"{name}.py")
        else:
            raise ValueError(f"package {name!r}: {str(path)!r} is neither a folder nor a .py file")
    data = buffer.getvalue()
    return Package(name, data, hashlib.sha256(data).hexdigest())


def extract(name: str, data: bytes, sha256: str, folder: Path) -> None:
    """Extract package *name*'s zip *data* into *folder* (which then holds
    ``NAME/`` or ``NAME.py``), replacing what an earlier version left there.
    Blocking: run it in a thread.

    Raises:
        ValueError: *name* cannot be a package's (see :func:`pack`), *data* does not have
            the SHA-256 *sha256*, is not a zip,
            or holds a file outside ``NAME/`` and ``NAME.py``.
    """
    _check_name(name)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"package {name!r}: the download does not match its SHA-256")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ValueError(f"package {name!r}: not a zip: {exc}") from None
    with archive:
        for member in archive.namelist():
            parts = PurePosixPath(member).parts
            inside = member == f"{name}.py" or (
                len(parts) > 1 and parts[0] == name and ".." not in parts and "\\" not in member
            )
            if not inside:
                raise ValueError(f"package {name!r}: the zip holds {member!r}, outside the package")
        shutil.rmtree(folder / name, ignore_errors=True)
        (folder / f"{name}.py").unlink(missing_ok=True)
        archive.extractall(folder)
