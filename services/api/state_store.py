"""Posteriors and expected-limits jobs shared by every API process, and kept over restarts.

uvicorn runs one process per ``--workers``; a client that POSTs a posterior to one
process may fetch its figure from another. Each stored object is therefore written
to a folder (``ALPNRE_STATE_DIR``, default ``<data_dir>/.api-state``) as well as kept
in the process's own LRU memory. A process that misses in memory reads the file.

NOTE: the files are Python pickles, written and read only by the API. Anyone who can
write to the state folder can run code in the API process, so the folder must be
writable by the API alone, like the registry.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Generic, TypeVar

__all__ = ["SharedStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_SUFFIX = ".pkl"
PRUNE_EVERY = 16


class SharedStore(Generic[T]):
    """Objects by id: the ``size`` least recently used in memory, the latest on disk.

    Parameters
    ----------
    folder
        Folder of the pickles, created on first write. None keeps objects in memory only.
    size
        Objects kept in memory and, separately, files kept in the folder (pruned to
        ``size`` every ``PRUNE_EVERY`` writes).
    """

    def __init__(self, folder: Path | None, size: int) -> None:
        self.folder = folder
        self.size = size
        self._items: OrderedDict[str, T] = OrderedDict()
        self._lock = threading.Lock()
        self._writes = 0

    def put(self, key: str, item: T) -> None:
        """Keep ``item`` in memory and write it to the folder (replacing an older file)."""
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        self.write(key, item)

    def write(self, key: str, item: T) -> None:
        """Write ``item`` to the folder only, e.g. after the owner changed it in place."""
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        # Write then rename, so that another process never reads a partly written file.
        descriptor, temporary = tempfile.mkstemp(dir=self.folder, prefix=f".{key}-")
        try:
            with os.fdopen(descriptor, "wb") as stream:
                pickle.dump(item, stream, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(temporary, self.folder / f"{key}{_SUFFIX}")
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        # Listing the folder costs about a millisecond, so prune every PRUNE_EVERY writes;
        # the folder contains at most size + PRUNE_EVERY files.
        with self._lock:
            self._writes += 1
            prune = self._writes % PRUNE_EVERY == 0
        if prune:
            self._prune()

    def get(self, key: str, *, cache: bool = True) -> T | None:
        """Return the object from memory, else from the folder, or None when it is unknown.

        Without ``cache`` an object read from the folder is not kept in memory. Use it
        for objects that their creating process still changes (a running job): that
        process has the live object in memory, and the others read the latest file.
        """
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        item = self._read(key)
        if item is not None and cache:
            with self._lock:
                self._items[key] = item
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return item

    def _read(self, key: str) -> T | None:
        if self.folder is None or not key.replace("-", "").isalnum():
            return None
        path = self.folder / f"{key}{_SUFFIX}"
        try:
            with open(path, "rb") as stream:
                return pickle.load(stream)  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as error:
            log.warning("cannot read stored object %s: %s", path, error)
            return None

    def _prune(self) -> None:
        assert self.folder is not None
        entries = []
        for path in self.folder.glob(f"*{_SUFFIX}"):
            try:
                entries.append((path.stat().st_mtime, path))
            except FileNotFoundError:  # another process removed it meanwhile
                continue
        excess = len(entries) - self.size
        if excess <= 0:
            return
        for _, path in sorted(entries)[:excess]:
            path.unlink(missing_ok=True)
