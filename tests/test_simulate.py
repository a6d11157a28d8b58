"""The simulator and its Parquet batches: reproducibility, idempotence, metadata."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
from alpnre.config import IRF_1DC_SOUTH, IRF_NORTH, IRF_SOUTH, config_hash, parse_config
from alpnre.dataset import DatasetError, batch_path, read_manifest, validate_batch_file
from alpnre.physics.irf import load_instrument_response
from alpnre.simulate import (
    batch_rows,
    batch_seed_sequence,
    expected_counts,
    run_batch,
    simulate_batch,
)
from conftest import gammapy_data_file, small_config_dict


def test_batch_seed_matches_spawn():
    spawned = np.random.SeedSequence(42).spawn(4)[3]
    direct = batch_seed_sequence(42, 3)
    assert np.random.default_rng(spawned).random() == np.random.default_rng(direct).random()


def test_batch_rows_split():
    assert [batch_rows(1050, 500, i) for i in range(3)] == [500, 500, 50]
    with pytest.raises(ValueError, match="outside"):
        batch_rows(1050, 500, 3)


def test_simulate_batch_columns(small_config):
    table = simulate_batch(small_config, 8, seed=1)
    npred = np.stack(table.column("npred").to_numpy(zero_copy_only=False))
    counts = np.stack(table.column("counts").to_numpy(zero_copy_only=False))
    assert table.num_rows == 8
    assert npred.shape == (8, 40)
    assert np.all(npred >= 0)
    assert np.all(np.isfinite(npred))
    assert counts.dtype == np.int32
    for name in small_config.parameter_names:
        assert name in table.column_names
    assert len(set(table.column("bfield_seed").to_pylist())) == 8


def test_simulate_batch_reproducible(small_config):
    first = simulate_batch(small_config, 4, seed=batch_seed_sequence(9, 2))
    second = simulate_batch(small_config, 4, seed=batch_seed_sequence(9, 2))
    other = simulate_batch(small_config, 4, seed=batch_seed_sequence(9, 3))
    assert first.equals(second)
    assert not first.equals(other)


def test_run_batch_writes_metadata(small_config, tmp_path):
    result = run_batch(small_config, tmp_path, 0, run_seed=3, batch_size=5, n_simulations=7)
    info = validate_batch_file(result.path, expected_rows=5, config_hash=config_hash(small_config))
    assert info.metadata["run_seed"] == 3
    assert info.metadata["batch_index"] == 0
    assert info.metadata["config_hash"] == config_hash(small_config)
    assert len(info.metadata["energy_edges_tev"]) == 41
    assert json.loads(info.metadata["config"])["name"] == small_config.name
    assert info.metadata["preset"] == "confident"


def test_run_batch_idempotent(small_config, tmp_path, caplog):
    first = run_batch(small_config, tmp_path, 1, run_seed=3, batch_size=5, n_simulations=7)
    inode = first.path.stat().st_ino
    with caplog.at_level(logging.INFO, logger="alpnre.simulate"):
        second = run_batch(small_config, tmp_path, 1, run_seed=3, batch_size=5, n_simulations=7)
    assert second.skipped
    assert second.sha256 == first.sha256
    assert second.path.stat().st_ino == inode
    assert "already exists and validates" in caplog.text


def test_run_batch_same_file_bytes(small_config, tmp_path):
    a = run_batch(small_config, tmp_path / "a", 0, run_seed=8, batch_size=4, n_simulations=4)
    b = run_batch(small_config, tmp_path / "b", 0, run_seed=8, batch_size=4, n_simulations=4)
    assert pq.read_table(a.path).equals(pq.read_table(b.path))
    assert a.sha256 == b.sha256


def test_run_batch_rewrites_corrupt_file(small_config, tmp_path):
    path = batch_path(tmp_path, 0)
    path.write_bytes(b"not parquet")
    result = run_batch(small_config, tmp_path, 0, run_seed=3, batch_size=3, n_simulations=3)
    assert not result.skipped
    assert validate_batch_file(path).n_rows == 3


def test_validate_rejects_truncated_file(small_config, tmp_path):
    result = run_batch(small_config, tmp_path, 0, run_seed=3, batch_size=3, n_simulations=3)
    data = result.path.read_bytes()
    result.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="batch-000000.parquet: not a readable Parquet"):
        validate_batch_file(result.path)


def test_manifest_of_run(small_run):
    manifest = read_manifest(small_run)
    assert manifest.complete
    assert manifest.n_rows == 1200
    assert manifest.n_batches == 6
    assert len({record.sha256 for record in manifest.batches}) == 6


def test_zero_coupling_has_no_alp_imprint(small_config):
    """npred at g -> 0 equals npred of pure EBL absorption whatever the B field."""
    instrument = load_instrument_response(small_config)
    params = {
        name: np.full(2, small_config.prior(name).sample(np.random.default_rng(0), 1)[0])
        for name in small_config.parameter_names
    }
    params["g_per_gev"] = np.full(2, 1e-20)
    npred = expected_counts(small_config, instrument, params, np.array([1, 2], dtype=np.uint64))
    assert np.allclose(npred[0], npred[1], rtol=1e-10)


def test_strong_coupling_changes_spectrum(small_config):
    instrument = load_instrument_response(small_config)
    params = {
        name: np.full(2, small_config.prior(name).sample(np.random.default_rng(0), 1)[0])
        for name in small_config.parameter_names
    }
    params["g_per_gev"] = np.array([1e-20, 5e-11])
    params["m_neV"] = np.array([10.0, 10.0])
    npred = expected_counts(small_config, instrument, params, np.array([1, 1], dtype=np.uint64))
    assert np.max(np.abs(npred[1] / np.maximum(npred[0], 1e-9) - 1)) > 0.05


@pytest.mark.requires_data
@pytest.mark.parametrize("relative", [IRF_NORTH, IRF_SOUTH, IRF_1DC_SOUTH])
def test_simulate_with_real_irf(relative):
    if gammapy_data_file(relative) is None:
        pytest.skip(f"{relative} not under $GAMMAPY_DATA")
    data = small_config_dict()
    data["irf"] = {"gammapy_data_file": relative, "allow_builtin_fallback": False}
    config = parse_config(data)
    table = simulate_batch(config, 3, seed=2)
    npred = np.stack(table.column("npred").to_numpy(zero_copy_only=False))
    assert not load_instrument_response(config).is_approximation
    assert np.all(npred >= 0)
    assert npred.sum(axis=1).min() > 100


def test_builtin_fallback_is_labelled(monkeypatch, tmp_path):
    monkeypatch.setenv("GAMMAPY_DATA", str(tmp_path))
    config = parse_config(small_config_dict())
    instrument = load_instrument_response(config)
    assert instrument.is_approximation
    assert instrument.irf_id.startswith("builtin-approximation")
