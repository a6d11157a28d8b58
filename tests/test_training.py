"""Streaming, training, checkpoints and published estimators."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from alpnre.config import parse_config
from alpnre.dataset import DatasetError, read_manifest, write_manifest
from alpnre.nre import (
    EstimatorSpec,
    RatioEstimator,
    TrainingConfig,
    default_heads,
    nre_loss,
    parameter_axes,
)
from alpnre.registry import (
    EstimatorNotFoundError,
    list_estimators,
    load_estimator,
    publish_estimator,
    resolve_estimator,
    save_estimator,
)
from alpnre.runs import simulate_run
from alpnre.streaming import ParquetSpectra, read_spectra
from alpnre.training import load_training_data, split_files, train_estimator
from conftest import small_config_dict

FAST = {
    "max_epochs": 2,
    "batch_size": 64,
    "shuffle_buffer": 256,
    "embedding_width": 32,
    "n_features": 8,
    "head_width": 16,
    "patience": 5,
    "seed": 3,
}


def _files(run_dir):
    return load_training_data([run_dir]).files


def test_stream_covers_every_row_once(small_run):
    files = _files(small_run)
    names = ["m_neV", "g_per_gev"]
    dataset = ParquetSpectra(files, names, batch_size=100, shuffle_buffer=300, seed=1)
    batches = list(dataset)
    streamed = np.concatenate([b.theta.numpy() for b in batches])
    _, theta = read_spectra(files, names)
    assert len(streamed) == 1200
    assert np.allclose(np.sort(streamed[:, 0]), np.sort(theta[:, 0].astype(np.float32)))


def test_stream_order_depends_on_seed_and_epoch(small_run):
    files = _files(small_run)
    dataset = ParquetSpectra(files, ["m_neV"], batch_size=100, shuffle_buffer=300, seed=1)
    first = next(iter(dataset)).theta
    again = next(iter(dataset)).theta
    dataset.set_epoch(1)
    other_epoch = next(iter(dataset)).theta
    assert torch.equal(first, again)
    assert not torch.equal(first, other_epoch)


def test_stream_buffer_mixes_files(small_run):
    files = _files(small_run)
    dataset = ParquetSpectra(files, ["m_neV"], batch_size=200, shuffle_buffer=600, seed=2)
    file_of_value = {}
    for index, path in enumerate(files):
        values = np.float32(pq.read_table(path, columns=["m_neV"]).column("m_neV").to_numpy())
        file_of_value.update(dict.fromkeys(values.tolist(), index))
    batch = next(iter(dataset)).theta[:, 0].numpy().tolist()
    assert len({file_of_value[value] for value in batch}) >= 2


def test_poisson_redraw_changes_counts(small_run):
    files = _files(small_run)
    fixed = ParquetSpectra(files, ["m_neV"], batch_size=100, shuffle_buffer=300, seed=1)
    redrawn = ParquetSpectra(
        files, ["m_neV"], batch_size=100, shuffle_buffer=300, seed=1, poisson_redraw=True
    )
    a, b = next(iter(fixed)), next(iter(redrawn))
    assert torch.equal(a.theta, b.theta)
    assert not torch.equal(a.x, b.x)
    assert torch.equal(b.x, torch.round(b.x))


def _with_nan(source, target):
    table = pq.read_table(source)
    npred = table.column("npred").combine_chunks()
    values = npred.flatten().to_numpy().copy()
    values[:3] = np.nan
    width = npred.type.list_size
    column = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), width)
    counts = table.column("counts").combine_chunks().flatten().to_numpy().astype(np.float64)
    table = table.set_column(table.schema.get_field_index("npred"), "npred", column)
    pq.write_table(table, target)
    return counts


def test_nonfinite_rows_stop_training(small_run, tmp_path):
    bad = tmp_path / "batch-000000.parquet"
    _with_nan(_files(small_run)[0], bad)
    dataset = ParquetSpectra(
        [bad], ["m_neV"], batch_size=50, shuffle_buffer=100, poisson_redraw=True
    )
    with pytest.raises(DatasetError, match=r"batch-000000.parquet: 1 rows contain NaN"):
        list(dataset)


def test_nonfinite_rows_dropped_on_request(small_run, tmp_path):
    bad = tmp_path / "batch-000000.parquet"
    _with_nan(_files(small_run)[0], bad)
    dataset = ParquetSpectra(
        [bad],
        ["m_neV"],
        batch_size=50,
        shuffle_buffer=100,
        poisson_redraw=True,
        drop_nonfinite=True,
    )
    rows = sum(len(batch.x) for batch in dataset)
    assert dataset.n_dropped == 1
    assert rows == 150


def test_corrupt_file_named(tmp_path):
    broken = tmp_path / "batch-000003.parquet"
    broken.write_bytes(b"PAR1 truncated")
    dataset = ParquetSpectra([broken], ["m_neV"], batch_size=8, shuffle_buffer=8)
    with pytest.raises(DatasetError, match="batch-000003.parquet: corrupt or partial"):
        list(dataset)


def test_split_holds_out_whole_files(small_run):
    files = _files(small_run)
    train, validation = split_files(files, 0.2, seed=0)
    assert len(validation) == 1
    assert set(train).isdisjoint(validation)
    assert len(train) + len(validation) == len(files)


def test_mixing_configs_rejected(small_run, tmp_path):
    data = small_config_dict()
    data["observation"]["livetime_h"] = 10.0
    other = tmp_path / "other"
    simulate_run(
        parse_config(data),
        other,
        n_simulations=4,
        batch_size=2,
        run_seed=1,
        workers=1,
        progress=False,
    )
    with pytest.raises(DatasetError, match="cannot be mixed"):
        load_training_data([small_run, other])


def test_missing_batch_file_reported(small_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small_run, copy)
    (copy / "batch-000002.parquet").unlink()
    with pytest.raises(DatasetError, match="batch-000002.parquet: listed in the manifest"):
        load_training_data([copy])


def _model(config):
    training = TrainingConfig(**FAST)
    names, one_dim, two_dim = default_heads(config)
    spec = EstimatorSpec(
        n_bins=40,
        axes=parameter_axes(config, names),
        one_dim=one_dim,
        two_dim=two_dim,
        training=training,
    )
    return RatioEstimator(spec), spec


def test_streaming_loss_equals_in_memory(small_run):
    """The same minibatches give the same loss whether streamed or held in memory."""
    data = load_training_data([small_run])
    model, spec = _model(data.config)
    model.eval()
    dataset = ParquetSpectra(
        data.files,
        spec.parameter_names,
        batch_size=100,
        shuffle_buffer=300,
        seed=4,
        transform_theta=spec.transform_theta,
    )
    in_memory = list(dataset)
    with torch.no_grad():
        streamed = [float(nre_loss(model, b.x, b.theta, 10.0)) for b in dataset]
        held = [float(nre_loss(model, b.x, b.theta, 10.0)) for b in in_memory]
    assert streamed == held


def test_resume_matches_uninterrupted(small_run, tmp_path):
    data = load_training_data([small_run])
    training = TrainingConfig(**{**FAST, "max_epochs": 3})
    full = train_estimator(data, training, tmp_path / "full", progress=False)
    train_estimator(data, training, tmp_path / "split", progress=False, stop_after_epochs=1)
    resumed = train_estimator(data, training, tmp_path / "split", progress=False)
    assert [m["train_loss"] for m in resumed.metrics] == [m["train_loss"] for m in full.metrics]
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_resume_under_new_stopping_rules(small_run, tmp_path):
    """A training stopped by hand is finished by rerunning it with fewer max_epochs."""
    data = load_training_data([small_run])
    longer = TrainingConfig(**{**FAST, "max_epochs": 6, "patience": 8})
    train_estimator(data, longer, tmp_path / "work", progress=False, stop_after_epochs=2)

    finished = train_estimator(
        data, TrainingConfig(**{**FAST, "max_epochs": 2}), tmp_path / "work", progress=False
    )
    # Any other change starts afresh: one epoch run gives one epoch of metrics.
    changed = TrainingConfig(**{**FAST, "max_epochs": 2, "learning_rate": 5e-4})
    restarted = train_estimator(
        data, changed, tmp_path / "work", progress=False, stop_after_epochs=1
    )

    assert len(finished.metrics) == 2
    assert finished.best_epoch in (0, 1)
    assert len(restarted.metrics) == 1
    assert (tmp_path / "work" / "checkpoint-replaced.pt").exists()


def test_resume_checkpoint_with_stopping_rules(small_run, tmp_path):
    """Checkpoints whose fingerprint still lists max_epochs and patience resume."""
    data = load_training_data([small_run])
    longer = TrainingConfig(**{**FAST, "max_epochs": 6})
    train_estimator(data, longer, tmp_path / "work", progress=False, stop_after_epochs=2)
    path = tmp_path / "work" / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    fingerprint = json.loads(payload["fingerprint"])
    fingerprint["training"].update(max_epochs=6, patience=5)
    payload["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
    torch.save(payload, path)

    finished = train_estimator(
        data, TrainingConfig(**{**FAST, "max_epochs": 2}), tmp_path / "work", progress=False
    )

    assert len(finished.metrics) == 2
    assert not (tmp_path / "work" / "checkpoint-replaced.pt").exists()


def test_published_estimator_reloads(small_run, tmp_path):
    data = load_training_data([small_run])
    result = train_estimator(data, TrainingConfig(**FAST), tmp_path / "work", progress=False)
    estimator_id = publish_estimator(
        tmp_path / "registry", result.model, result.config, metrics=result.metrics
    )
    loaded = load_estimator(resolve_estimator(estimator_id, tmp_path / "registry"))
    latest = resolve_estimator(f"latest:{result.config.name}", tmp_path / "registry")
    x = torch.as_tensor(read_spectra(data.files[:1], ["m_neV"])[0][:16], dtype=torch.float32)
    theta = torch.zeros(16, len(result.spec.axes))
    with torch.no_grad():
        before = result.model(x, theta)
        after = loaded.model(x, theta)
    assert torch.equal(before["1d"], after["1d"])
    assert torch.equal(before["2d"], after["2d"])
    assert latest.name == estimator_id
    assert [e["estimator_id"] for e in list_estimators(tmp_path / "registry")] == [estimator_id]
    assert (latest / "loss.png").exists()


def test_tampered_estimator_rejected(small_run, tmp_path):
    config = load_training_data([small_run]).config
    model, _ = _model(config)
    folder = save_estimator(tmp_path / "est", model, config)
    metadata = json.loads((folder / "estimator.json").read_text())
    metadata["config_name"] = "edited"
    (folder / "estimator.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="do not match the recorded checksum"):
        load_estimator(folder)


def test_unknown_estimator_id(tmp_path):
    with pytest.raises(EstimatorNotFoundError, match="not found in the registry at"):
        resolve_estimator("nope", tmp_path)


def test_incomplete_manifest_keeps_finished_batches(small_run, tmp_path):
    copy = tmp_path / "partial"
    shutil.copytree(small_run, copy)
    manifest = read_manifest(copy)
    manifest.batches = manifest.batches[:3]
    write_manifest(copy, manifest)
    assert len(load_training_data([copy]).files) == 3


def test_learning_rate_decays_after_stalled_epochs():
    from alpnre.training import scheduled_learning_rate

    training = TrainingConfig(learning_rate=1e-3, lr_decay_factor=0.5, lr_decay_patience=2)
    # Improves, stalls twice (decay), stalls once, improves, stalls twice (decay).
    losses = [3.0, 2.0, 2.5, 2.1, 2.2, 1.9, 2.0, 1.95]

    assert scheduled_learning_rate([], training) == 1e-3
    assert scheduled_learning_rate(losses[:3], training) == 1e-3
    assert scheduled_learning_rate(losses[:4], training) == 5e-4
    assert scheduled_learning_rate(losses[:6], training) == 5e-4
    assert scheduled_learning_rate(losses, training) == 2.5e-4


def test_learning_rate_constant_by_default():
    from alpnre.training import scheduled_learning_rate

    assert scheduled_learning_rate([3.0, 3.1, 3.2, 3.3, 3.4], TrainingConfig()) == 1e-3
