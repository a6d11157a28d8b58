"""Training loop of the ratio estimator: streaming data, checkpoints, early stopping.

The loop is deterministic given the seed. The data order of epoch e depends on
``(seed, e)``, and the torch generator is reseeded from ``(seed, e)`` at the start of
each epoch. A training stopped after any epoch and resumed from its checkpoint
therefore reaches the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from alpnre.config import AnalysisConfig, config_from_json
from alpnre.dataset import DatasetError, RunManifest, read_manifest, validate_batch_file
from alpnre.nre import (
    EstimatorSpec,
    RatioEstimator,
    TrainingConfig,
    default_heads,
    nre_loss,
    parameter_axes,
    resolve_device,
)
from alpnre.streaming import ParquetSpectra

__all__ = [
    "TrainingData",
    "TrainingResult",
    "load_training_data",
    "scheduled_learning_rate",
    "train_estimator",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
# Settings that decide when a training stops but not what its epochs compute. They are
# left out of a checkpoint's fingerprint, so a checkpoint resumes under new ones, and
# rerunning with --max-epochs set to the epochs done publishes the best weights so far.
_STOPPING_RULES = ("max_epochs", "patience")


@dataclass
class TrainingData:
    """Simulation runs to train on: their files, config and manifests."""

    config: AnalysisConfig
    manifests: list[RunManifest]
    files: list[Path]
    energy_edges_tev: list[float]

    @property
    def manifest_hashes(self) -> list[str]:
        return [manifest.manifest_hash() for manifest in self.manifests]


def load_training_data(run_dirs: Sequence[str | Path]) -> TrainingData:
    """Collect the batch files of one or more runs, checking they can be mixed.

    Raises
    ------
    DatasetError
        When runs were made with different configs or energy binnings, a run has no
        finished batch, or a file is missing, corrupt or partial (named in the message).
    """
    if not run_dirs:
        raise DatasetError("no simulation runs given: pass at least one run folder")
    manifests = [read_manifest(run_dir) for run_dir in run_dirs]
    first = manifests[0]
    for run_dir, manifest in zip(run_dirs, manifests, strict=True):
        if manifest.config_hash != first.config_hash:
            raise DatasetError(
                f"{run_dir}: run {manifest.run_id} was simulated with config "
                f"{manifest.config_name!r} (hash {manifest.config_hash[:12]}), run "
                f"{first.run_id} with {first.config_name!r} (hash {first.config_hash[:12]}); "
                "runs with different configs or energy binnings cannot be mixed"
            )
        if not np.allclose(manifest.energy_edges_tev, first.energy_edges_tev, rtol=1e-9):
            raise DatasetError(f"{run_dir}: energy binning differs from run {first.run_id}")
        if not manifest.batches:
            raise DatasetError(f"{run_dir}: run {manifest.run_id} has no finished batch yet")

    files = []
    for run_dir, manifest in zip(run_dirs, manifests, strict=True):
        for record in sorted(manifest.batches, key=lambda r: r.batch_index):
            path = Path(run_dir) / record.file
            if not path.exists():
                raise DatasetError(f"{path}: listed in the manifest of {run_dir} but missing")
            validate_batch_file(path, expected_rows=record.n_rows, config_hash=first.config_hash)
            files.append(path)
    config = config_from_json(json.dumps(first.config))
    return TrainingData(config, manifests, files, list(first.energy_edges_tev))


def split_files(
    files: Sequence[Path], validation_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """Hold out whole files for validation, chosen by a seeded permutation."""
    if len(files) < 2:
        raise DatasetError(
            f"training needs at least 2 batch files to hold out whole files for validation, "
            f"got {len(files)}: simulate with a smaller --batch-size"
        )
    n_validation = min(len(files) - 1, max(1, round(validation_fraction * len(files))))
    order = np.random.default_rng([seed, 7]).permutation(len(files))
    validation = sorted(files[i] for i in order[:n_validation])
    training = sorted(files[i] for i in order[n_validation:])
    return training, validation


def input_normalisation(
    dataset: ParquetSpectra, max_batches: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin mean and standard deviation of log1p(counts) over the first minibatches."""
    total = None
    total_sq = None
    n = 0
    for i, batch in enumerate(dataset):
        values = torch.log1p(batch.x).double()
        total = values.sum(0) if total is None else total + values.sum(0)
        total_sq = (values**2).sum(0) if total_sq is None else total_sq + (values**2).sum(0)
        n += len(values)
        if i + 1 >= max_batches:
            break
    if total is None or total_sq is None or n == 0:
        raise DatasetError("no rows to compute the input normalisation from")
    mean = (total / n).numpy()
    std = np.sqrt(np.maximum((total_sq / n).numpy() - mean**2, 0.0))
    return mean, std


@dataclass
class TrainingResult:
    """Trained model and what is needed to publish it."""

    model: RatioEstimator
    spec: EstimatorSpec
    config: AnalysisConfig
    metrics: list[dict[str, float]]
    best_epoch: int
    n_dropped_rows: int
    data_manifest_hashes: list[str]
    training_files: list[str] = field(default_factory=list)
    validation_files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _epoch_loss(
    model: RatioEstimator,
    dataset: ParquetSpectra,
    device: torch.device,
    bnre_lambda: float,
    optimiser: torch.optim.Optimizer | None,
    loader_workers: int,
    marginal_pairs: int = 1,
) -> float:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=loader_workers, persistent_workers=False
    )
    total, n_batches = 0.0, 0
    for batch in loader:
        x = batch.x.to(device)
        theta = batch.theta.to(device)
        if optimiser is None:
            with torch.no_grad():
                loss = nre_loss(model, x, theta, bnre_lambda, marginal_pairs)
        else:
            optimiser.zero_grad(set_to_none=True)
            loss = nre_loss(model, x, theta, bnre_lambda, marginal_pairs)
            loss.backward()
            optimiser.step()
        total += float(loss.detach())
        n_batches += 1
    if n_batches == 0:
        raise DatasetError(
            "an epoch produced no minibatch: the data set has fewer rows than batch_size"
        )
    return total / n_batches


def scheduled_learning_rate(validation_losses: Sequence[float], training: TrainingConfig) -> float:
    """Learning rate of the next epoch, given the validation losses of the epochs so far.

    The rate starts at ``learning_rate`` and is multiplied by ``lr_decay_factor`` each
    time ``lr_decay_patience`` epochs in a row bring no lower validation loss. It is a
    function of the loss history alone, so a resumed training continues with the
    rate it had.
    """
    rate, best, stalled = training.learning_rate, math.inf, 0
    for loss in validation_losses:
        if loss < best:
            best, stalled = loss, 0
            continue
        stalled += 1
        if stalled >= training.lr_decay_patience:
            rate *= training.lr_decay_factor
            stalled = 0
    return rate


def _seed_epoch(seed: int, epoch: int) -> None:
    # epoch -1 seeds the weight initialisation; SeedSequence takes non-negative entropy only.
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch + 1]).generate_state(1)[0]))


def train_estimator(
    data: TrainingData,
    training: TrainingConfig,
    work_dir: str | Path,
    *,
    progress: bool = True,
    resume: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    stop_after_epochs: int | None = None,
) -> TrainingResult:
    """Train the standard estimator on streamed simulations.

    Parameters
    ----------
    work_dir
        Folder for the per-epoch checkpoint; a checkpoint found there is resumed
        when ``resume`` is true and it was made with the same data and settings.
    on_epoch
        Called with each epoch's metrics (services publish progress with it).
    stop_after_epochs
        Stop after this many epochs of this call (used to test resuming).
    """
    start = time.perf_counter()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(training.device)
    torch.use_deterministic_algorithms(False)

    # Data: whole files held out for validation.
    names, one_dim, two_dim = default_heads(data.config, training.nuisance_marginals)
    spec = EstimatorSpec(
        n_bins=len(data.energy_edges_tev) - 1,
        axes=parameter_axes(data.config, names),
        one_dim=one_dim,
        two_dim=two_dim,
        training=training,
    )
    train_files, validation_files = split_files(
        data.files, training.validation_fraction, training.seed
    )
    common: dict[str, Any] = {
        "parameter_names": names,
        "batch_size": training.batch_size,
        "shuffle_buffer": training.shuffle_buffer,
        "drop_nonfinite": training.drop_nonfinite,
        "transform_theta": spec.transform_theta,
    }
    train_set = ParquetSpectra(
        train_files, seed=training.seed, poisson_redraw=training.poisson_redraw, **common
    )
    validation_set = ParquetSpectra(validation_files, seed=training.seed + 1, **common)
    log.info(
        "training on %d files, validating on %d, device %s",
        len(train_files),
        len(validation_files),
        device,
    )

    # Model, optimiser and, when resuming, their saved state.
    _seed_epoch(training.seed, -1)
    model = RatioEstimator(spec)
    model.set_normalisation(*input_normalisation(ParquetSpectra(train_files, **common)))
    model.to(device)
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay
    )
    fingerprint = {
        "training": training.model_dump(mode="json", exclude=set(_STOPPING_RULES)),
        "data": data.manifest_hashes,
    }
    state = _load_checkpoint(work_dir, fingerprint, model, optimiser) if resume else None
    metrics: list[dict[str, float]] = state["metrics"] if state else []
    best_loss = state["best_loss"] if state else math.inf
    best_epoch = state["best_epoch"] if state else -1
    best_weights = state["best_weights"] if state else None
    first_epoch = len(metrics)

    bar = tqdm(total=training.max_epochs, initial=first_epoch, unit="epoch", disable=not progress)
    epochs_run = 0
    for epoch in range(first_epoch, training.max_epochs):
        if epoch - best_epoch > training.patience and best_epoch >= 0:
            break
        _seed_epoch(training.seed, epoch)
        learning_rate = scheduled_learning_rate(
            [record["validation_loss"] for record in metrics], training
        )
        for group in optimiser.param_groups:
            group["lr"] = learning_rate
        train_set.set_epoch(epoch)
        model.train()
        epoch_start = time.perf_counter()
        train_loss = _epoch_loss(
            model,
            train_set,
            device,
            training.bnre_lambda,
            optimiser,
            training.num_workers,
            training.marginal_pairs,
        )
        model.eval()
        validation_set.set_epoch(0)
        validation_loss = _epoch_loss(
            model,
            validation_set,
            device,
            training.bnre_lambda,
            None,
            training.num_workers,
            training.marginal_pairs,
        )
        record = {
            "epoch": float(epoch),
            "train_loss": train_loss,
            "validation_loss": validation_loss,
            "learning_rate": learning_rate,
            "seconds": time.perf_counter() - epoch_start,
        }
        metrics.append(record)
        if validation_loss < best_loss:
            best_loss, best_epoch = validation_loss, epoch
            best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        _save_checkpoint(
            work_dir, fingerprint, model, optimiser, metrics, best_loss, best_epoch, best_weights
        )
        log.info(
            "epoch %d: train loss %.4f, validation loss %.4f", epoch, train_loss, validation_loss
        )
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{validation_loss:.3f}")
        bar.update(1)
        if on_epoch is not None:
            on_epoch(record)
        epochs_run += 1
        if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
            break
    bar.close()

    if best_weights is not None:
        model.load_state_dict(best_weights)
    model.to("cpu").eval()
    return TrainingResult(
        model=model,
        spec=spec,
        config=data.config,
        metrics=metrics,
        best_epoch=best_epoch,
        n_dropped_rows=train_set.n_dropped + validation_set.n_dropped,
        data_manifest_hashes=data.manifest_hashes,
        training_files=[str(path) for path in train_files],
        validation_files=[str(path) for path in validation_files],
        seconds=time.perf_counter() - start,
    )


def train_and_save(
    run_dirs: Sequence[str | Path],
    output: Path,
    training: TrainingConfig,
    *,
    progress: bool = True,
    registry: Path | None = None,
) -> Path:
    """Train on runs, save the estimator to ``output`` (and publish it to ``registry``)."""
    from alpnre.registry import new_estimator_id, publish_estimator, save_estimator

    data = load_training_data(list(run_dirs))
    result = train_estimator(data, training, output / "work", progress=progress)
    extra = {
        "best_epoch": result.best_epoch,
        "n_dropped_rows": result.n_dropped_rows,
        "data_manifest_hashes": result.data_manifest_hashes,
        "training_seconds": result.seconds,
        "n_training_files": len(result.training_files),
        "n_validation_files": len(result.validation_files),
        "validation_files": result.validation_files,
        "energy_edges_tev": data.energy_edges_tev,
        "irf_id": data.manifests[0].irf_id,
        "irf_is_approximation": data.manifests[0].irf_is_approximation,
    }
    folder = save_estimator(
        output / "estimator",
        result.model,
        result.config,
        estimator_id=new_estimator_id(result.config.name),
        metrics=result.metrics,
        extra=extra,
    )
    if registry is not None:
        estimator_id = publish_estimator(
            registry, result.model, result.config, metrics=result.metrics, extra=extra
        )
        log.info("published as %s in %s", estimator_id, registry)
    return folder


def _save_checkpoint(
    work_dir: Path,
    fingerprint: dict[str, Any],
    model: RatioEstimator,
    optimiser: torch.optim.Optimizer,
    metrics: list[dict[str, float]],
    best_loss: float,
    best_epoch: int,
    best_weights: dict[str, torch.Tensor] | None,
) -> None:
    payload = {
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
        "model": model.state_dict(),
        "optimiser": optimiser.state_dict(),
        "metrics": json.dumps(metrics),
        "best_loss": best_loss,
        "best_epoch": best_epoch,
        "best_weights": best_weights,
    }
    temporary = work_dir / f".{CHECKPOINT_NAME}.tmp"
    torch.save(payload, temporary)
    temporary.replace(work_dir / CHECKPOINT_NAME)


def _comparable_fingerprint(text: str) -> dict[str, Any]:
    """Parse a stored fingerprint without the stopping rules.

    Checkpoints written before the stopping rules left the fingerprint still contain
    them, and still resume.
    """
    fingerprint = json.loads(text)
    for key in _STOPPING_RULES:
        fingerprint.get("training", {}).pop(key, None)
    return fingerprint


def _load_checkpoint(
    work_dir: Path,
    fingerprint: dict[str, Any],
    model: RatioEstimator,
    optimiser: torch.optim.Optimizer,
) -> dict[str, Any] | None:
    path = work_dir / CHECKPOINT_NAME
    if not path.exists():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if _comparable_fingerprint(payload["fingerprint"]) != json.loads(
        json.dumps(fingerprint, sort_keys=True)
    ):
        # Keep the old checkpoint: a mistyped setting must not cost a long training.
        replaced_path = path.with_name(f"{path.stem}-replaced{path.suffix}")
        path.replace(replaced_path)
        log.warning(
            "%s was made with other data or settings, so training starts afresh. The old "
            "checkpoint was moved to %s",
            path,
            replaced_path,
        )
        return None
    model.load_state_dict(payload["model"])
    optimiser.load_state_dict(payload["optimiser"])
    metrics = json.loads(payload["metrics"])
    log.info("resuming from %s after epoch %d", path, len(metrics) - 1)
    return {
        "metrics": metrics,
        "best_loss": payload["best_loss"],
        "best_epoch": payload["best_epoch"],
        "best_weights": payload["best_weights"],
    }
