"""Resolving a training request's runs and checking that the data can train the estimator.

The API runs these checks before it queues a training, so a bad request gets a 4xx
response at once. The worker runs them again because the data can change in between.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
from alpnre.dataset import MANIFEST_NAME, DatasetError
from alpnre.nre import TrainingConfig, default_heads
from alpnre.training import TrainingData, split_files

__all__ = ["RunNotFoundError", "TrainingInputError", "check_trainable", "resolve_run_dirs"]


class RunNotFoundError(LookupError):
    """A run id or folder of a training request has no simulation run."""


class TrainingInputError(ValueError):
    """Hyperparameters that do not fit the data; ``field`` names the request field to fix."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def resolve_run_dirs(data_dir: Path, runs: Sequence[str]) -> list[Path]:
    """Turn run ids (``<data_dir>/<run id>``) and run folders into run folders.

    An entry that contains a path separator is taken as a folder, anything else as a
    run id.

    Raises
    ------
    RunNotFoundError
        When a run has no ``manifest.json``; the message names the first such run.
    """
    run_dirs = []
    for run in runs:
        run_dir = Path(run) if "/" in run or Path(run).is_absolute() else data_dir / run
        if not (run_dir / MANIFEST_NAME).is_file():
            raise RunNotFoundError(
                f"simulation run {run!r} not found: {run_dir} has no {MANIFEST_NAME} "
                f"(run ids are folder names under the data folder {data_dir})"
            )
        run_dirs.append(run_dir)
    return run_dirs


def check_trainable(data: TrainingData, training: TrainingConfig) -> None:
    """Check that ``training`` can run on ``data`` before any epoch is spent on it.

    Raises
    ------
    TrainingInputError
        When a nuisance marginal is not a free parameter of the runs' config, there are
        fewer than 2 batch files (none could be held out for validation), or the
        training or validation files hold fewer rows than one minibatch.
    """
    try:
        default_heads(data.config, training.nuisance_marginals)
    except ValueError as error:
        raise TrainingInputError(str(error), "hyperparameters.nuisance_marginals") from None
    try:
        train_files, validation_files = split_files(
            data.files, training.validation_fraction, training.seed
        )
    except DatasetError as error:
        raise TrainingInputError(str(error), "runs") from None
    for role, files in (("training", train_files), ("validation", validation_files)):
        n_rows = sum(pq.read_metadata(path).num_rows for path in files)
        if n_rows < training.batch_size:
            raise TrainingInputError(
                f"the {role} files hold {n_rows} rows, fewer than batch_size="
                f"{training.batch_size}: lower batch_size or simulate more spectra",
                "hyperparameters.batch_size",
            )
