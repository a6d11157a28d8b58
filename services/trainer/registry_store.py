"""Estimator registries in a local folder or at an fsspec URL.

The layout is the one of :mod:`alpnre.registry`: ``estimators/<id>/`` folders (with
``estimator.json``, ``weights.pt``, ``loss.png`` and, once validated,
``validation/report.json``) and one ``latest/<config name>`` file per config naming its
newest estimator id.

A local folder, or a ``file://`` URL, is published to as :func:`alpnre.registry.publish_estimator`
does: copied under a hidden name and renamed, so a reader never sees half an estimator.
Any other fsspec URL (``s3://``, ``gcs://``, ``memory://``, ...) is uploaded file by
file with ``estimator.json`` last. Readers skip a folder without ``estimator.json``, so
they never see an estimator whose metadata is missing. Object stores have no atomic
rename, so a reader that lists during an upload can see the folder's other files.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
from pathlib import Path
from typing import Any, cast

import fsspec
from alpnre.registry import METADATA_NAME, WEIGHTS_NAME
from fsspec.implementations.local import LocalFileSystem

__all__ = ["ESTIMATOR_ID_PATTERN", "VALIDATION_REPORT", "RegistryStore"]

log = logging.getLogger(__name__)

# Estimator ids name folders: no path separator, no leading dot.
ESTIMATOR_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
VALIDATION_REPORT = "validation/report.json"


class RegistryStore:
    """Publish estimator folders to a registry and read their metadata back.

    Parameters
    ----------
    location
        A local folder, or an fsspec URL of one (``file:///srv/registry``,
        ``s3://bucket/registry``). Credentials of remote file systems come from the
        usual fsspec sources (environment, config files), never from the URL here.
    """

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        if "://" in self.location:
            fs, root = fsspec.core.url_to_fs(self.location)
        else:
            fs, root = LocalFileSystem(), str(Path(self.location).absolute())
        self.fs: fsspec.AbstractFileSystem = fs
        self.root: str = root.rstrip("/") or "/"

    @property
    def local_root(self) -> Path | None:
        """The registry's local folder, or None for a remote file system."""
        return Path(self.root) if isinstance(self.fs, LocalFileSystem) else None

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def local_folder(self, estimator_id: str) -> Path | None:
        """Local folder of an estimator, or None for a remote registry."""
        root = self.local_root
        return None if root is None else root / "estimators" / estimator_id

    # --- publishing ---------------------------------------------------------------

    def publish_folder(self, folder: Path, estimator_id: str, config_name: str) -> None:
        """Publish the estimator folder ``folder`` as ``estimator_id`` and point ``latest`` at it.

        Raises
        ------
        FileExistsError
            When the registry already contains ``estimator_id``, because published ids
            never change.
        """
        if not ESTIMATOR_ID_PATTERN.match(estimator_id):
            raise ValueError(f"invalid estimator id {estimator_id!r}")
        if not (folder / METADATA_NAME).exists() or not (folder / WEIGHTS_NAME).exists():
            raise FileNotFoundError(f"{folder} is not an estimator folder")
        root = self.local_root
        if root is None:
            self._upload(folder, estimator_id)
        else:
            self._copy_local(root, folder, estimator_id)
        self._write_latest(config_name, estimator_id)
        log.info("published estimator %s to %s", estimator_id, self.location)

    def _copy_local(self, root: Path, folder: Path, estimator_id: str) -> None:
        final = root / "estimators" / estimator_id
        if final.exists():
            raise FileExistsError(f"estimator {estimator_id} already exists in {root}")
        staging = root / "estimators" / f".{estimator_id}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(folder, staging)
        os.rename(staging, final)

    def _upload(self, folder: Path, estimator_id: str) -> None:
        target = self._path("estimators", estimator_id)
        if self.fs.exists(posixpath.join(target, METADATA_NAME)):
            raise FileExistsError(f"estimator {estimator_id} already exists in {self.location}")
        files = sorted(path for path in folder.rglob("*") if path.is_file())
        # estimator.json last: readers take a folder with it as complete.
        files.sort(key=lambda path: path.name == METADATA_NAME)
        for path in files:
            remote = posixpath.join(target, *path.relative_to(folder).parts)
            self.fs.makedirs(posixpath.dirname(remote), exist_ok=True)
            self.fs.put_file(str(path), remote)

    def _write_latest(self, config_name: str, estimator_id: str) -> None:
        root = self.local_root
        if root is None:
            self.fs.makedirs(self._path("latest"), exist_ok=True)
            self.fs.pipe_file(self._path("latest", config_name), f"{estimator_id}\n".encode())
            return
        latest = root / "latest"
        latest.mkdir(parents=True, exist_ok=True)
        temporary = latest / f".{config_name}.tmp"
        temporary.write_text(estimator_id + "\n")
        os.replace(temporary, latest / config_name)

    # --- reading ------------------------------------------------------------------

    def exists(self, estimator_id: str) -> bool:
        """Return whether the registry contains a complete estimator with this id."""
        if not ESTIMATOR_ID_PATTERN.match(estimator_id):
            return False
        return bool(self.fs.exists(self._path("estimators", estimator_id, METADATA_NAME)))

    def estimator_ids(self) -> list[str]:
        """Ids of the published estimators (folders with ``estimator.json``), sorted."""
        folder = self._path("estimators")
        if not self.fs.exists(folder):
            return []
        names = (
            posixpath.basename(str(entry).rstrip("/")) for entry in self.fs.ls(folder, detail=False)
        )
        return sorted(
            name for name in names if ESTIMATOR_ID_PATTERN.match(name) and self.exists(name)
        )

    def read_metadata(self, estimator_id: str) -> dict[str, Any] | None:
        """Read an estimator's ``estimator.json``; None when the registry lacks the estimator."""
        return self._read_json(estimator_id, METADATA_NAME)

    def read_validation_report(self, estimator_id: str) -> dict[str, Any] | None:
        """Read an estimator's ``validation/report.json``; None when it has none."""
        return self._read_json(estimator_id, VALIDATION_REPORT)

    def _read_json(self, estimator_id: str, name: str) -> dict[str, Any] | None:
        if not ESTIMATOR_ID_PATTERN.match(estimator_id):
            return None
        path = self._path("estimators", estimator_id, *name.split("/"))
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return cast(dict[str, Any], json.loads(raw))
