"""Shared fixtures: seeded randomness, real IRF data location, small configs."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The CTA IRFs that CI and developers have beside the repository, in $GAMMAPY_DATA layout.
SHARED_GAMMAPY_DATA = REPO_ROOT.parent / "shared" / "data" / "gammapy-data"

if "GAMMAPY_DATA" not in os.environ and SHARED_GAMMAPY_DATA.exists():
    os.environ["GAMMAPY_DATA"] = str(SHARED_GAMMAPY_DATA)
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Seed the global generators that third-party code may still use."""
    random.seed(1234)
    np.random.seed(1234)  # noqa: NPY002 (the legacy global state third-party code uses)
    try:
        import torch

        torch.manual_seed(1234)
    except ImportError:
        pass


def gammapy_data_file(relative: str) -> Path | None:
    """Path of a file under $GAMMAPY_DATA, or None when it is not available."""
    root = os.environ.get("GAMMAPY_DATA")
    if not root:
        return None
    path = Path(root) / relative
    return path if path.exists() else None


def small_config_dict(**overrides: object) -> dict:
    """The default NGC 1275 config as a mapping, with a coarser energy axis for speed."""
    import yaml

    data = yaml.safe_load((REPO_ROOT / "configs" / "ngc1275_cta_north_50h.yaml").read_text())
    data["observation"].update({"n_energy_bins": 40, "n_energy_true_bins": 120})
    for key, value in overrides.items():
        data[key] = value
    return data


@pytest.fixture
def small_config():
    """Default config with 40 reconstructed and 120 true energy bins (fast to simulate)."""
    from alpnre.config import parse_config

    return parse_config(small_config_dict())


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A simulation run of 1200 spectra in 6 batch files with the small config."""
    from alpnre.config import parse_config
    from alpnre.runs import simulate_run

    config = parse_config(small_config_dict())
    run_dir = tmp_path_factory.mktemp("small-run")
    simulate_run(
        config, run_dir, n_simulations=1200, batch_size=200, run_seed=5, workers=1, progress=False
    )
    return run_dir
