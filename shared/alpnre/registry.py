"""Published estimators: immutable folders with weights, metadata and a checksum.

An estimator folder contains

- ``weights.pt``: the model's ``state_dict`` only (loaded with ``weights_only=True``, so
  loading never unpickles arbitrary objects);
- ``estimator.json``: the analysis config and its hash, the parameter axes and heads,
  the training settings, per-epoch metrics, the input normalisation, the hashes of the
  training data's manifests, library and dependency versions, and the checksum;
- ``loss.png``: the training and validation loss curves.

A registry is a folder of estimator folders (``estimators/<id>/``) plus one
``latest/<config name>`` text file per config that names the newest estimator id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

import alpnre
from alpnre.config import AnalysisConfig, config_from_json, config_hash, config_to_json
from alpnre.nre import EstimatorSpec, RatioEstimator

__all__ = [
    "EstimatorNotFoundError",
    "LoadedEstimator",
    "list_estimators",
    "load_estimator",
    "publish_estimator",
    "resolve_estimator",
    "save_estimator",
]

log = logging.getLogger(__name__)

WEIGHTS_NAME = "weights.pt"
METADATA_NAME = "estimator.json"
DEPENDENCIES = ("numpy", "torch", "swyft", "gammapy", "gammaALPs", "astropy", "pyarrow")


class EstimatorNotFoundError(LookupError):
    """No estimator with the requested id, path or config name."""


def _dependency_versions() -> dict[str, str]:
    versions = {"alpnre": alpnre.__version__}
    for name in DEPENDENCIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def new_estimator_id(config_name: str) -> str:
    """Return a fresh, sortable estimator id: config name, UTC time and a random suffix."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{config_name}-{stamp}-{uuid.uuid4().hex[:6]}"


def save_estimator(
    folder: str | Path,
    model: RatioEstimator,
    config: AnalysisConfig,
    *,
    estimator_id: str | None = None,
    metrics: list[dict[str, float]] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write an estimator folder and return its path.

    The checksum covers the weights file and the metadata (without the checksum
    field itself), so any change to either is detected by :func:`load_estimator`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights_path = folder / WEIGHTS_NAME
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    torch.save(state, weights_path)

    metadata: dict[str, Any] = {
        "estimator_id": estimator_id or folder.name,
        "created_at": datetime.now(UTC).isoformat(),
        "config_name": config.name,
        "config_hash": config_hash(config),
        "config": json.loads(config_to_json(config)),
        "preset": config.preset,
        "preset_version": config.preset_version,
        "spec": model.spec.model_dump(mode="json"),
        "normalisation": {
            "transform": "log1p(counts)",
            "mean": model.embedding.mean.tolist(),
            "std": model.embedding.std.tolist(),
        },
        "metrics": metrics or [],
        "versions": _dependency_versions(),
        "weights_sha256": _sha256(weights_path),
        **(extra or {}),
    }
    metadata["checksum"] = _metadata_checksum(metadata)
    (folder / METADATA_NAME).write_text(json.dumps(metadata, indent=2))
    if metrics:
        plot_losses(metrics, folder / "loss.png")
    log.info("saved estimator %s to %s", metadata["estimator_id"], folder)
    return folder


def _metadata_checksum(metadata: dict[str, Any]) -> str:
    body = {key: value for key, value in metadata.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def plot_losses(metrics: list[dict[str, float]], path: str | Path) -> None:
    """Save the training and validation loss per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [record["epoch"] for record in metrics]
    figure, axis = plt.subplots(figsize=(5, 3.5), layout="constrained")
    axis.plot(epochs, [record["train_loss"] for record in metrics], "o-", label="training")
    axis.plot(epochs, [record["validation_loss"] for record in metrics], "s-", label="validation")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.set_ylabel("NRE loss (BCE + BNRE penalty)")
    axis.legend()
    figure.savefig(path, dpi=120)
    plt.close(figure)


@dataclass
class LoadedEstimator:
    """An estimator ready for inference, with its metadata."""

    model: RatioEstimator
    config: AnalysisConfig
    metadata: dict[str, Any]
    path: Path

    @property
    def spec(self) -> EstimatorSpec:
        return self.model.spec

    @property
    def estimator_id(self) -> str:
        return str(self.metadata["estimator_id"])

    @property
    def checksum(self) -> str:
        return str(self.metadata["checksum"])


def load_estimator(folder: str | Path, device: str | torch.device = "cpu") -> LoadedEstimator:
    """Load an estimator folder, verifying its checksum.

    Raises
    ------
    EstimatorNotFoundError
        When the folder has no ``estimator.json`` or ``weights.pt``.
    ValueError
        When the weights or metadata do not match the recorded checksum.
    """
    folder = Path(folder)
    metadata_path = folder / METADATA_NAME
    weights_path = folder / WEIGHTS_NAME
    if not metadata_path.exists() or not weights_path.exists():
        raise EstimatorNotFoundError(
            f"{folder} is not an estimator folder: expected {METADATA_NAME} and {WEIGHTS_NAME}"
        )
    metadata = json.loads(metadata_path.read_text())
    if _metadata_checksum(metadata) != metadata.get("checksum"):
        raise ValueError(f"{metadata_path}: metadata do not match the recorded checksum")
    if _sha256(weights_path) != metadata["weights_sha256"]:
        raise ValueError(f"{weights_path}: weights do not match the recorded checksum")

    spec = EstimatorSpec.model_validate(metadata["spec"])
    model = RatioEstimator(spec)
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    model.to(device).eval()
    config = config_from_json(json.dumps(metadata["config"]))
    return LoadedEstimator(model=model, config=config, metadata=metadata, path=folder)


def publish_estimator(
    registry: str | Path,
    model: RatioEstimator,
    config: AnalysisConfig,
    *,
    metrics: list[dict[str, float]] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Publish an estimator into a registry folder and point ``latest`` at it.

    The folder is written under a temporary name and renamed, so a published id is
    never seen half-written, and an existing id is never overwritten.
    """
    registry = Path(registry)
    estimator_id = new_estimator_id(config.name)
    final = registry / "estimators" / estimator_id
    staging = registry / "estimators" / f".{estimator_id}.tmp"
    save_estimator(staging, model, config, estimator_id=estimator_id, metrics=metrics, extra=extra)
    os.rename(staging, final)
    latest = registry / "latest"
    latest.mkdir(parents=True, exist_ok=True)
    pointer = latest / config.name
    temporary = latest / f".{config.name}.tmp"
    temporary.write_text(estimator_id + "\n")
    os.replace(temporary, pointer)
    log.info("published estimator %s in %s", estimator_id, registry)
    return estimator_id


def resolve_estimator(reference: str | Path, registry: str | Path | None = None) -> Path:
    """Find an estimator folder from a path, an id in ``registry``, or ``latest:<config>``."""
    path = Path(reference)
    if (path / METADATA_NAME).exists():
        return path
    if (path / "estimator" / METADATA_NAME).exists():
        # The output folder of 'alpnre train' or 'alpnre demo' contains the estimator.
        return path / "estimator"
    if path.is_dir() and registry is None:
        raise EstimatorNotFoundError(
            f"{path} has no {METADATA_NAME}: give the estimator folder itself (the one with "
            f"{METADATA_NAME} and {WEIGHTS_NAME})"
        )
    if registry is None:
        raise EstimatorNotFoundError(
            f"estimator {str(reference)!r} not found: give an estimator folder, or an id "
            "together with a registry"
        )
    registry = Path(registry)
    text = str(reference)
    if text.startswith("latest:") or text == "latest":
        config_name = text.partition(":")[2]
        pointer = registry / "latest" / config_name
        if not config_name or not pointer.exists():
            known = (
                sorted(p.name for p in (registry / "latest").glob("*")) if registry.exists() else []
            )
            raise EstimatorNotFoundError(
                f"no latest estimator for config {config_name!r}; configs with estimators: {known}"
            )
        text = pointer.read_text().strip()
    folder = registry / "estimators" / text
    if not (folder / METADATA_NAME).exists():
        raise EstimatorNotFoundError(f"estimator {text!r} not found in the registry at {registry}")
    return folder


def list_estimators(registry: str | Path) -> list[dict[str, Any]]:
    """Summaries (id, config, creation time, checksum) of the estimators of a registry."""
    root = Path(registry) / "estimators"
    summaries = []
    for folder in sorted(root.glob("*")) if root.exists() else []:
        if folder.name.startswith(".") or not (folder / METADATA_NAME).exists():
            continue
        metadata = json.loads((folder / METADATA_NAME).read_text())
        summaries.append(
            {
                "estimator_id": metadata["estimator_id"],
                "config_name": metadata["config_name"],
                "config_hash": metadata["config_hash"],
                "created_at": metadata["created_at"],
                "checksum": metadata["checksum"],
            }
        )
    return summaries


def remove_staging(registry: str | Path) -> None:
    """Delete half-written estimator folders left by an interrupted publish."""
    for folder in (Path(registry) / "estimators").glob(".*.tmp"):
        shutil.rmtree(folder, ignore_errors=True)
