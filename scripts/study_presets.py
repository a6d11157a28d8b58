"""Compare the cluster prior presets 'confident' and 'informed' at the same simulation budget.

For each preset the script simulates a training run, trains an estimator, measures its
expected coverage on held-out simulations and its expected 95 % limits on g from no-ALP
mocks. It then evaluates both estimators on the same mock observations, simulated with
the cluster at the Fermi-LAT 2016 Perseus values (the 'confident' values, which are the
centres of the 'informed' priors), with and without an injected ALP signal. For each
posterior it reports the area of the 95 % HPD region of (log10 m, log10 g) as a fraction
of the prior area. Last, both estimators are validated on held-out spectra whose cluster
is drawn from the 'informed' priors, which shows the coverage of the 'confident'
estimator when the true cluster differs from the values it assumes.

Every seed derives from --seed, so the same arguments give the same numbers up to
floating-point differences between machines. Outputs in --output: results.json,
limits.png, posteriors.png, and the runs and estimators they come from. A preset whose
estimator folder already exists is loaded instead of trained again.

    GAMMAPY_DATA=/path/to/gammapy-data python scripts/study_presets.py --output study-presets-out
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from alpnre.calibration import simulate_held_out, validate_estimator
from alpnre.config import AnalysisConfig, parse_config
from alpnre.dataset import run_batch_files
from alpnre.limits import compute_expected_limits, null_hypothesis_config
from alpnre.nre import TrainingConfig
from alpnre.posterior import compute_posterior
from alpnre.registry import LoadedEstimator, load_estimator, save_estimator
from alpnre.runs import simulate_run
from alpnre.streaming import read_spectra
from alpnre.training import load_training_data, train_estimator
from alpnre.validation import hpd_mask

log = logging.getLogger("study_presets")

CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "ngc1275_cta_north_50h.yaml"
PRESETS = ("confident", "informed")
JOINT_KEY = "m_neV__g_per_gev"
# Injected signal of the mock observations, the same as the demo's.
SIGNAL_M_NEV = 30.0
SIGNAL_G_PER_GEV = 5e-11
# Relative width of the log-uniform prior that pins m and g of the mock observations,
# because the config rejects 'fixed' priors on the parameters of interest.
PIN_RELATIVE_WIDTH = 1e-6
# Offsets added to --seed so that each simulation set has its own seed.
SEED_OFFSETS = {
    "training": 0,
    "coverage": 1000,
    "limits": 2000,
    "signal": 3000,
    "null": 4000,
    "mismatch": 5000,
}
ECP_LEVELS = [0.68, 0.95]
LIMIT_MASSES_NEV = [1.0, 3.0, 10.0, 30.0]


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--output", type=Path, default=Path("study-presets-out"), help="output folder"
    )
    parser.add_argument(
        "--n-simulations", type=int, default=6000, help="training spectra per preset"
    )
    parser.add_argument("--batch-size", type=int, default=500, help="spectra per simulation batch")
    parser.add_argument("--max-epochs", type=int, default=15, help="training epochs")
    parser.add_argument(
        "--patience", type=int, default=5, help="epochs without validation improvement"
    )
    parser.add_argument(
        "--lr-decay-factor",
        type=float,
        default=1.0,
        help="learning-rate factor after 2 epochs without validation improvement",
    )
    parser.add_argument("--n-coverage", type=int, default=200, help="held-out spectra per preset")
    parser.add_argument("--n-limit-mocks", type=int, default=20, help="no-ALP mocks per preset")
    parser.add_argument(
        "--n-observations",
        type=int,
        default=5,
        help="common mock observations of each kind (with and without signal)",
    )
    parser.add_argument("--n-energy-bins", type=int, default=50, help="reconstructed-energy bins")
    parser.add_argument("--n-energy-true-bins", type=int, default=150, help="true-energy bins")
    parser.add_argument("--grid-size", type=int, default=64, help="posterior grid points per axis")
    parser.add_argument("--workers", type=int, default=2, help="simulation processes")
    parser.add_argument("--seed", type=int, default=1, help="base seed of every simulation set")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    return parser.parse_args()


def preset_config(preset: str, args: argparse.Namespace) -> AnalysisConfig:
    """Load the shipped CTAO-North config with another preset and the reduced binning."""
    raw = yaml.safe_load(CONFIG_PATH.read_text())
    raw["name"] = f"{raw['name']}-{preset}-{args.n_energy_bins}bins"
    raw["preset"] = preset
    raw["observation"]["n_energy_bins"] = args.n_energy_bins
    raw["observation"]["n_energy_true_bins"] = args.n_energy_true_bins
    return parse_config(raw, source=f"{CONFIG_PATH.name} with preset {preset!r}")


def pinned_signal_config(config: AnalysisConfig) -> AnalysisConfig:
    """Return ``config`` with m and g pinned at the injected signal."""
    data = config.model_dump(mode="json")
    for name, value in (("m_neV", SIGNAL_M_NEV), ("g_per_gev", SIGNAL_G_PER_GEV)):
        data["parameters"][name] = {
            "kind": "log_uniform",
            "low": value,
            "high": value * (1.0 + PIN_RELATIVE_WIDTH),
        }
    data["name"] = f"{config.name}-signal"
    return parse_config(data, source=f"signal variant of {config.name!r}")


def train_preset(
    config: AnalysisConfig, folder: Path, args: argparse.Namespace
) -> tuple[LoadedEstimator, dict[str, float]]:
    """Simulate the training run and train the estimator, or load a finished one."""
    estimator_folder = folder / "estimator"
    timing: dict[str, float] = {}
    if (estimator_folder / "estimator.json").exists():
        log.info("loading the finished estimator in %s", estimator_folder)
        return load_estimator(estimator_folder, device="cpu"), timing

    step = time.perf_counter()
    simulate_run(
        config,
        folder / "run",
        n_simulations=args.n_simulations,
        batch_size=args.batch_size,
        run_seed=args.seed + SEED_OFFSETS["training"],
        workers=args.workers,
        progress=False,
    )
    timing["simulation_s"] = time.perf_counter() - step

    step = time.perf_counter()
    data = load_training_data([folder / "run"])
    training = TrainingConfig(
        max_epochs=args.max_epochs,
        patience=args.patience,
        lr_decay_factor=args.lr_decay_factor,
        batch_size=128,
        seed=args.seed,
        device="cpu",
    )
    result = train_estimator(data, training, folder / "work", progress=False)
    timing["training_s"] = time.perf_counter() - step
    extra = {
        "best_epoch": result.best_epoch,
        "training_seconds": result.seconds,
        "energy_edges_tev": data.energy_edges_tev,
        "irf_id": data.manifests[0].irf_id,
        "irf_is_approximation": data.manifests[0].irf_is_approximation,
    }
    save_estimator(
        estimator_folder, result.model, result.config, metrics=result.metrics, extra=extra
    )
    return load_estimator(estimator_folder, device="cpu"), timing


def coverage_summary(report: Any) -> dict[str, Any]:
    """ECP, 95 % Clopper-Pearson band and verdict at the levels of ECP_LEVELS, per marginal."""
    summary: dict[str, Any] = {"verdict": report.verdict, "tarp_area": float(report.tarp.area)}
    for key, result in report.coverage.items():
        rows = []
        for level in ECP_LEVELS:
            index = int(np.argmin(np.abs(result.levels - level)))
            rows.append(
                {
                    "level": float(result.levels[index]),
                    "ecp": float(result.ecp[index]),
                    "band95": [
                        float(result.band95_lower[index]),
                        float(result.band95_upper[index]),
                    ],
                    "verdict": result.verdicts[index],
                }
            )
        summary[key] = {"verdict": result.verdict, "levels": rows}
    return summary


def simulate_observations(
    config: AnalysisConfig, folder: Path, n: int, seed: int, workers: int
) -> np.ndarray:
    """Simulate ``n`` spectra of ``config`` and return their counts, shape (n, n_bins)."""
    simulate_run(
        config,
        folder,
        n_simulations=n,
        batch_size=n,
        run_seed=seed,
        workers=workers,
        progress=False,
    )
    counts, _ = read_spectra(run_batch_files(folder), ["g_per_gev"])
    return counts


def hpd_fraction(
    estimator: LoadedEstimator, counts: np.ndarray, grid_size: int
) -> tuple[float, Any]:
    """Area of the 95 % HPD region of (log10 m, log10 g) as a fraction of the prior area.

    The grid is uniform in log10 m and log10 g over the prior ranges, so the fraction of
    grid points inside the region estimates the fraction of the prior area.
    """
    joint = compute_posterior(estimator, counts, grid_size=grid_size, marginals=[]).two_dim[
        JOINT_KEY
    ]
    return float(hpd_mask(joint.density, 0.95).mean()), joint


def limit_table(limits: Any) -> list[dict[str, Any]]:
    """Median and 68 % band of the expected limit on g at the masses of LIMIT_MASSES_NEV."""
    low, high = limits.band_68
    rows = []
    for mass in LIMIT_MASSES_NEV:
        x = np.log10(mass)
        rows.append(
            {
                "m_neV": mass,
                "median_g_per_gev": float(
                    10 ** np.interp(x, limits.log10_mass_grid, limits.median)
                ),
                "band68_g_per_gev": [
                    float(10 ** np.interp(x, limits.log10_mass_grid, low)),
                    float(10 ** np.interp(x, limits.log10_mass_grid, high)),
                ],
            }
        )
    return rows


def plot_limits(limits: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.0, 4.4), layout="constrained")
    for color, (preset, result) in zip(("C0", "C3"), limits.items(), strict=False):
        mass = 10.0**result.log10_mass_grid
        low, high = result.band_68
        axis.fill_between(mass, 10.0**low, 10.0**high, color=color, alpha=0.25, lw=0)
        axis.plot(mass, 10.0**result.median, color=color, label=f"{preset}: median, 68 % band")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("ALP mass m [neV]")
    axis.set_ylabel("expected 95 % upper limit on g [GeV$^{-1}$]")
    n_mocks = next(iter(limits.values())).n_mocks
    axis.set_title(f"Expected limits, {n_mocks} no-ALP mocks per preset", fontsize=9)
    axis.legend(fontsize=8)
    figure.savefig(path, dpi=130)
    plt.close(figure)


def plot_posteriors(examples: dict[str, dict[str, Any]], path: Path) -> None:
    """Draw the 2-dim posterior of the first signal and no-ALP observation per preset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ("signal", "null")
    presets = list(examples)
    figure, axes = plt.subplots(
        len(kinds),
        len(presets),
        figsize=(4.2 * len(presets), 7.0),
        layout="constrained",
        squeeze=False,
    )
    for row, kind in enumerate(kinds):
        for column, preset in enumerate(presets):
            joint, fraction = examples[preset][kind]
            axis = axes[row][column]
            axis.pcolormesh(
                joint.grid_x, joint.grid_y, joint.density.T, cmap="Greys", shading="auto"
            )
            mask = hpd_mask(joint.density, 0.95).astype(float)
            axis.contour(joint.grid_x, joint.grid_y, mask.T, levels=[0.5], colors="C3")
            if kind == "signal":
                axis.plot(np.log10(SIGNAL_M_NEV), np.log10(SIGNAL_G_PER_GEV), "C2*", ms=12)
            title = "m = 30 neV, g = 5e-11 GeV$^{-1}$" if kind == "signal" else "no ALP"
            axis.set_title(f"{preset}, {title}\n95 % HPD: {fraction:.0%} of prior area", fontsize=9)
            axis.set_xlabel("log10(m / neV)")
            axis.set_ylabel("log10(g / GeV$^{-1}$)")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def mismatched_cluster_coverage(
    estimators: dict[str, LoadedEstimator], args: argparse.Namespace
) -> dict[str, Any]:
    """Coverage of both estimators on held-out spectra whose cluster follows 'informed'.

    The 'confident' estimator assumes the cluster values it was trained with. When the
    true cluster differs within the literature uncertainties, its posteriors are
    expected to be overconfident. The 'informed' estimator on the same spectra shows
    what marginalising gains.
    """
    held_out = simulate_held_out(
        preset_config("informed", args),
        args.n_coverage,
        args.seed + SEED_OFFSETS["mismatch"],
    )
    summary: dict[str, Any] = {"held_out": "cluster drawn from the 'informed' priors"}
    for preset, estimator in estimators.items():
        report = validate_estimator(
            estimator,
            held_out=held_out,
            grid_size=args.grid_size,
            levels=sorted(set(np.round(np.linspace(0.0, 1.0, 21), 2).tolist() + ECP_LEVELS)),
            write=False,
        )
        log.info("%s estimator on 'informed' clusters: %s", preset, report.summary())
        summary[preset] = coverage_summary(report)
    return summary


def main() -> None:
    args = parse_arguments()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.output.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "arguments": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
        },
        "presets": {},
    }

    # Common mock observations: the cluster at the 'confident' (Fermi-LAT 2016) values.
    reference = preset_config("confident", args)
    observations = {
        "signal": simulate_observations(
            pinned_signal_config(reference),
            args.output / "observations" / "signal",
            args.n_observations,
            args.seed + SEED_OFFSETS["signal"],
            args.workers,
        ),
        "null": simulate_observations(
            null_hypothesis_config(reference),
            args.output / "observations" / "null",
            args.n_observations,
            args.seed + SEED_OFFSETS["null"],
            args.workers,
        ),
    }

    estimators: dict[str, LoadedEstimator] = {}
    limits: dict[str, Any] = {}
    examples: dict[str, dict[str, Any]] = {}
    for preset in args.presets:
        config = preset_config(preset, args)
        folder = args.output / preset
        estimator, timing = train_preset(config, folder, args)
        estimators[preset] = estimator
        log.info("%s: estimator %s ready", preset, estimator.estimator_id)

        step = time.perf_counter()
        report = validate_estimator(
            estimator,
            n_simulations=args.n_coverage,
            seed=args.seed + SEED_OFFSETS["coverage"],
            grid_size=args.grid_size,
            levels=sorted(set(np.round(np.linspace(0.0, 1.0, 21), 2).tolist() + ECP_LEVELS)),
        )
        timing["coverage_s"] = time.perf_counter() - step
        log.info("%s", report.summary())

        step = time.perf_counter()
        limits[preset] = compute_expected_limits(
            config,
            estimator,
            n_mocks=args.n_limit_mocks,
            seed=args.seed + SEED_OFFSETS["limits"],
            grid_size=args.grid_size,
            workers=args.workers,
            run_dir=folder / "null-mocks",
        )
        timing["limits_s"] = time.perf_counter() - step

        fractions: dict[str, list[float]] = {}
        examples[preset] = {}
        for kind, counts in observations.items():
            fractions[kind] = []
            for index, x in enumerate(counts):
                fraction, joint = hpd_fraction(estimator, x, args.grid_size)
                fractions[kind].append(fraction)
                if index == 0:
                    examples[preset][kind] = (joint, fraction)

        results["presets"][preset] = {
            "estimator_id": estimator.estimator_id,
            "best_epoch": estimator.metadata.get("best_epoch"),
            "best_validation_loss": min(
                (record["validation_loss"] for record in estimator.metadata.get("metrics", [])),
                default=None,
            ),
            "coverage": coverage_summary(report),
            "expected_limits": limit_table(limits[preset]),
            "hpd95_area_fraction": {
                kind: {"values": values, "median": float(np.median(values))}
                for kind, values in fractions.items()
            },
            "timing_s": timing,
        }
        (args.output / "results.json").write_text(json.dumps(results, indent=2))

    if set(estimators) == set(PRESETS):
        results["mismatch"] = mismatched_cluster_coverage(estimators, args)
        (args.output / "results.json").write_text(json.dumps(results, indent=2))

    plot_limits(limits, args.output / "limits.png")
    plot_posteriors(examples, args.output / "posteriors.png")
    log.info("results in %s", args.output / "results.json")


if __name__ == "__main__":
    main()
