"""The store of posteriors and jobs that all API processes share."""

from __future__ import annotations

import logging
import os

from services.api.state_store import PRUNE_EVERY, SharedStore


def test_store_reads_other_process_write(tmp_path):
    first: SharedStore[dict] = SharedStore(tmp_path, size=4)
    second: SharedStore[dict] = SharedStore(tmp_path, size=4)

    first.put("post-1", {"value": 1})

    assert second.get("post-1") == {"value": 1}
    assert second.get("post-2") is None


def test_uncached_get_reads_latest_write(tmp_path):
    owner: SharedStore[dict] = SharedStore(tmp_path, size=4)
    reader: SharedStore[dict] = SharedStore(tmp_path, size=4)
    job = {"state": "queued"}
    owner.put("limits-1", job)
    assert reader.get("limits-1", cache=False) == {"state": "queued"}

    job["state"] = "completed"
    owner.write("limits-1", job)

    assert reader.get("limits-1", cache=False) == {"state": "completed"}


def test_prune_keeps_latest_files(tmp_path):
    store: SharedStore[int] = SharedStore(tmp_path, size=3)
    for index in range(PRUNE_EVERY):
        store.put(f"post-{index}", index)
        # Distinct modification times, oldest first, whatever the file system's resolution.
        os.utime(tmp_path / f"post-{index}.pkl", (1000 + index, 1000 + index))

    expected_names = [f"post-{index}.pkl" for index in range(PRUNE_EVERY - 3, PRUNE_EVERY)]
    assert sorted(path.name for path in tmp_path.glob("*.pkl")) == expected_names
    assert SharedStore(tmp_path, size=3).get("post-0") is None


def test_unreadable_or_unsafe_key_gives_none(tmp_path, caplog):
    store: SharedStore[int] = SharedStore(tmp_path, size=3)
    (tmp_path / "post-bad.pkl").write_bytes(b"not a pickle")
    (tmp_path.parent / "outside.pkl").write_bytes(b"")

    with caplog.at_level(logging.WARNING):
        assert store.get("post-bad") is None
    assert "cannot read stored object" in caplog.text
    assert store.get("../outside") is None


def test_memory_only_without_folder():
    store: SharedStore[int] = SharedStore(None, size=2)
    for index in range(3):
        store.put(f"post-{index}", index)

    assert store.get("post-0") is None
    assert store.get("post-2") == 2
