"""Progress of simulation runs in Redis, shared by the API and the workers.

Each run has three keys under ``<prefix>:run:<run_id>``:

- the hash itself: request parameters, timestamps (Unix seconds), the count of batches
  in each status (``batches_queued``, ...), ``rows_written`` and a run-level ``error``;
- ``…:batches``: batch index → status;
- ``…:errors``: batch index → JSON of the last error that failed the batch.

and the sorted set ``<prefix>:runs`` lists run ids by creation time. Batch status
changes go through one Lua script, so the counts stay equal to the statuses when
several workers update the same run at once, and a batch redelivered after it finished
is never counted twice.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import cast

import redis
from redis.typing import EncodableT, FieldT

from services.common import ID_PATTERN, RedisStore, optional_float

__all__ = [
    "RUN_ID_PATTERN",
    "BatchError",
    "BatchStatus",
    "ProgressStore",
    "RunProgress",
    "RunState",
]

# Run ids name folders, so they must not contain a path separator or start with a dot.
RUN_ID_PATTERN = ID_PATTERN


class BatchStatus(StrEnum):
    """Status of one batch of a run."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RunState(StrEnum):
    """State of a whole run."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Moves one batch to a new status and updates the run's counts in one step.
# KEYS: run hash, batches hash. ARGV: batch index, new status, rows (added on 'done'), now.
# Returns the previous status, or false when the run or batch is unknown.
# 'done' is final. A cancelled batch can only become 'done', which happens when it was
# already running at the cancellation. A cancelled batch that a worker picks up later
# therefore stays cancelled, and the worker skips it.
_TRANSITION_LUA = """
local old = redis.call('HGET', KEYS[2], ARGV[1])
if not old then return false end
local new = ARGV[2]
if old == new or old == 'done' then return old end
if old == 'cancelled' and new ~= 'done' then return old end
redis.call('HSET', KEYS[2], ARGV[1], new)
redis.call('HINCRBY', KEYS[1], 'batches_' .. old, -1)
redis.call('HINCRBY', KEYS[1], 'batches_' .. new, 1)
if new == 'done' then redis.call('HINCRBY', KEYS[1], 'rows_written', ARGV[3]) end
if new == 'running' then redis.call('HSETNX', KEYS[1], 'started_at', ARGV[4]) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[4])
local pending = tonumber(redis.call('HGET', KEYS[1], 'batches_queued'))
    + tonumber(redis.call('HGET', KEYS[1], 'batches_running'))
if pending == 0 then
    redis.call('HSETNX', KEYS[1], 'finished_at', ARGV[4])
else
    redis.call('HDEL', KEYS[1], 'finished_at')
end
return old
"""

# Cancels every queued batch of a run. KEYS: run hash, batches hash. ARGV: now, error
# (empty for a cancellation requested by a user). Returns the indices of the cancelled batches.
_CANCEL_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local statuses = redis.call('HGETALL', KEYS[2])
local cancelled = {}
for i = 1, #statuses, 2 do
    if statuses[i + 1] == 'queued' then
        redis.call('HSET', KEYS[2], statuses[i], 'cancelled')
        table.insert(cancelled, statuses[i])
    end
end
-- Lua's -0 reaches Redis as '-0', which HINCRBY rejects, hence the guard.
if #cancelled > 0 then
    redis.call('HINCRBY', KEYS[1], 'batches_queued', -#cancelled)
    redis.call('HINCRBY', KEYS[1], 'batches_cancelled', #cancelled)
end
if ARGV[2] == '' then
    redis.call('HSETNX', KEYS[1], 'cancelled_at', ARGV[1])
else
    redis.call('HSET', KEYS[1], 'error', ARGV[2])
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
if tonumber(redis.call('HGET', KEYS[1], 'batches_running')) == 0 then
    redis.call('HSETNX', KEYS[1], 'finished_at', ARGV[1])
end
return cancelled
"""


@dataclass(frozen=True)
class BatchError:
    """The error that failed one batch."""

    batch_index: int
    error_type: str
    message: str
    attempts: int
    at: float


@dataclass(frozen=True)
class RunProgress:
    """A snapshot of one run's progress."""

    run_id: str
    config_name: str
    config_hash: str
    n_simulations: int
    batch_size: int
    n_batches: int
    run_seed: int
    run_dir: str
    created_at: float
    batch_counts: dict[BatchStatus, int]
    rows_written: int
    started_at: float | None = None
    finished_at: float | None = None
    cancelled_at: float | None = None
    updated_at: float | None = None
    error: str | None = None
    batch_errors: list[BatchError] = field(default_factory=list)

    @property
    def state(self) -> RunState:
        """State of the run, derived from its batch counts and flags."""
        pending = self.batch_counts[BatchStatus.QUEUED] + self.batch_counts[BatchStatus.RUNNING]
        if self.error is not None:
            return RunState.FAILED
        if self.cancelled_at is not None:
            return RunState.CANCELLED
        if self.batch_counts[BatchStatus.DONE] == self.n_batches:
            return RunState.COMPLETED
        if pending == 0:
            return RunState.FAILED
        if self.started_at is None:
            return RunState.QUEUED
        return RunState.RUNNING

    def throughput(self, now: float | None = None) -> float | None:
        """Simulations written per second since the first batch started, or None."""
        if self.started_at is None or self.rows_written == 0:
            return None
        end = self.finished_at or (now if now is not None else time.time())
        elapsed = end - self.started_at
        return self.rows_written / elapsed if elapsed > 0 else None

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Estimated seconds until the pending batches finish at the current throughput."""
        pending_batches = (
            self.batch_counts[BatchStatus.QUEUED] + self.batch_counts[BatchStatus.RUNNING]
        )
        if pending_batches == 0:
            return 0.0 if self.state == RunState.COMPLETED else None
        throughput = self.throughput(now)
        if throughput is None:
            return None
        pending_rows = min(
            pending_batches * self.batch_size, self.n_simulations - self.rows_written
        )
        return pending_rows / throughput


class ProgressStore(RedisStore):
    """Run progress in Redis; see the module docstring for the key layout."""

    def __init__(self, client: redis.Redis, prefix: str = "alpnre") -> None:
        super().__init__(client, prefix)
        self._transition = client.register_script(_TRANSITION_LUA)
        self._cancel = client.register_script(_CANCEL_LUA)

    def _run_key(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}"

    def _keys(self, run_id: str) -> tuple[str, str, str]:
        run_key = self._run_key(run_id)
        return run_key, f"{run_key}:batches", f"{run_key}:errors"

    def lock_name(self, run_id: str) -> str:
        """Name of the Redis lock that serialises updates of the run's manifest."""
        return f"{self._run_key(run_id)}:manifest-lock"

    def create_run(
        self,
        *,
        run_id: str,
        config_name: str,
        config_hash: str,
        n_simulations: int,
        batch_size: int,
        n_batches: int,
        run_seed: int,
        run_dir: str,
    ) -> None:
        """Record a new run with all its batches queued."""
        now = time.time()
        run_key, batches_key, errors_key = self._keys(run_id)
        fields: dict[FieldT, EncodableT] = {
            "run_id": run_id,
            "config_name": config_name,
            "config_hash": config_hash,
            "n_simulations": n_simulations,
            "batch_size": batch_size,
            "n_batches": n_batches,
            "run_seed": run_seed,
            "run_dir": run_dir,
            "created_at": now,
            "updated_at": now,
            "rows_written": 0,
        }
        fields.update({f"batches_{status}": 0 for status in BatchStatus})
        fields["batches_queued"] = n_batches
        pipeline = self.client.pipeline(transaction=True)
        pipeline.delete(run_key, batches_key, errors_key)
        pipeline.hset(run_key, mapping=fields)
        pipeline.hset(batches_key, mapping=dict.fromkeys(range(n_batches), "queued"))
        pipeline.zadd(f"{self.prefix}:runs", {run_id: now})
        pipeline.execute()

    def set_status(
        self, run_id: str, batch_index: int, status: BatchStatus, rows: int = 0
    ) -> BatchStatus | None:
        """Move a batch to ``status`` and return its previous status (None: unknown batch).

        The move is skipped, and the previous status returned unchanged, when the batch
        is done, or cancelled and ``status`` is not done.
        """
        run_key, batches_key, _ = self._keys(run_id)
        previous = self._transition(
            keys=[run_key, batches_key],
            args=[batch_index, status.value, rows, time.time()],
        )
        return BatchStatus(previous) if previous else None

    def record_error(
        self, run_id: str, batch_index: int, error: BaseException, attempts: int
    ) -> None:
        """Store the error that failed a batch (the batch status is set separately)."""
        _, _, errors_key = self._keys(run_id)
        payload = {
            "batch_index": batch_index,
            "error_type": type(error).__name__,
            "message": str(error),
            "attempts": attempts,
            "at": time.time(),
        }
        self.client.hset(errors_key, str(batch_index), json.dumps(payload))

    def cancel(self, run_id: str, error: str | None = None) -> list[int] | None:
        """Cancel the queued batches of a run and return their indices (None: unknown run).

        Without ``error`` the run is marked cancelled; with it, the run is marked failed
        with that message (used when enqueueing failed part-way).
        """
        run_key, batches_key, _ = self._keys(run_id)
        cancelled = self._cancel(keys=[run_key, batches_key], args=[time.time(), error or ""])
        if cancelled is None:
            return None
        return sorted(int(index) for index in cancelled)

    def batch_status(self, run_id: str, batch_index: int) -> BatchStatus | None:
        """Status of one batch, or None when the run or batch is unknown."""
        _, batches_key, _ = self._keys(run_id)
        value = cast(str | None, self.client.hget(batches_key, str(batch_index)))
        return BatchStatus(value) if value else None

    def get(self, run_id: str) -> RunProgress | None:
        """Progress of one run, or None when the run is unknown."""
        return self._get_many([run_id])[0]

    def _get_many(self, run_ids: list[str]) -> list[RunProgress | None]:
        pipeline = self.client.pipeline(transaction=True)
        for run_id in run_ids:
            run_key, _, errors_key = self._keys(run_id)
            pipeline.hgetall(run_key)
            pipeline.hvals(errors_key)
        replies = pipeline.execute()
        return [
            _progress_from_fields(fields, raw_errors) if fields else None
            for fields, raw_errors in zip(replies[::2], replies[1::2], strict=True)
        ]

    def list_runs(self, offset: int, limit: int) -> tuple[list[RunProgress], int]:
        """Return a page of runs, newest first, and the total number of runs."""
        run_ids, total = self._page_ids(f"{self.prefix}:runs", offset, limit)
        runs = [progress for progress in self._get_many(run_ids) if progress is not None]
        return runs, total


def _progress_from_fields(fields: dict[str, str], raw_errors: list[str]) -> RunProgress:
    errors = [BatchError(**json.loads(raw)) for raw in raw_errors]
    return RunProgress(
        run_id=fields["run_id"],
        config_name=fields["config_name"],
        config_hash=fields["config_hash"],
        n_simulations=int(fields["n_simulations"]),
        batch_size=int(fields["batch_size"]),
        n_batches=int(fields["n_batches"]),
        run_seed=int(fields["run_seed"]),
        run_dir=fields["run_dir"],
        created_at=float(fields["created_at"]),
        batch_counts={status: int(fields[f"batches_{status}"]) for status in BatchStatus},
        rows_written=int(fields["rows_written"]),
        started_at=optional_float(fields, "started_at"),
        finished_at=optional_float(fields, "finished_at"),
        cancelled_at=optional_float(fields, "cancelled_at"),
        updated_at=optional_float(fields, "updated_at"),
        error=fields.get("error"),
        batch_errors=sorted(errors, key=lambda error: error.batch_index),
    )
