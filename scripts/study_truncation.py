"""Truncated rounds against the exact posterior, for the strong signals of a validation.

``alpnre validate --exact`` compares an amortised fixed-field estimator with the exact
posterior on held-out spectra. Strong ALP signals give posteriors narrower than the
64 x 64 grid's cells, which the amortised network smooths. This script takes the first
``--n-observations`` of those (exact posterior on fewer than 4 effective cells), runs one
truncated round for each (:func:`alpnre.truncation.truncate`), and compares on the
truncated box's own 64 x 64 grid:

* the amortised estimator's posterior restricted to the box,
* the truncated estimator's posterior,
* the exact posterior (cell averages where it is narrower than a cell),

by the Jensen-Shannon divergence of the (log10 m, log10 g) cell probabilities.
An observation whose box would hold more than 90 % of the prior gets no round. The
reason goes to the log and to results.json, and the study goes on.

The held-out spectra are those of the validation report (same seed), so the script
needs ``validation/report.json`` with an exact comparison beside the estimator.
Outputs in --output: results.json, truncation.png and one folder per round.

    GAMMAPY_DATA=/path/to/gammapy-data python scripts/study_truncation.py \\
        --estimator ff/estimator --output study-truncation-out
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from alpnre.calibration import grid_posteriors, simulate_held_out
from alpnre.exact import exact_posterior, refine_exact_posterior
from alpnre.nre import TrainingConfig
from alpnre.posterior import _log_ratios_2d
from alpnre.registry import LoadedEstimator, load_estimator
from alpnre.truncation import BoxTooWideError, truncate
from alpnre.validation import jensen_shannon_divergence

log = logging.getLogger("study_truncation")

POI = ("m_neV", "g_per_gev")


def log_probabilities_on_box(
    estimator: LoadedEstimator, counts: np.ndarray, grid_x: np.ndarray, grid_y: np.ndarray
) -> np.ndarray:
    """Log cell probabilities of the estimator's 2-dim posterior on a (log10 m, log10 g) grid.

    Both priors are log-uniform, so the prior is flat on the grid and the posterior is
    the normalised ratio.
    """
    spec = estimator.spec
    model = estimator.model.eval()
    mesh_x, mesh_y = np.meshgrid(grid_x, grid_y, indexing="ij")
    theta = np.zeros((mesh_x.size, len(spec.axes)), dtype=np.float32)
    for name, mesh in zip(POI, (mesh_x, mesh_y), strict=True):
        theta[:, spec.parameter_names.index(name)] = spec.axis(name).standardise(mesh.ravel())
    with torch.no_grad():
        features = model.embedding(torch.as_tensor(counts[None, :], dtype=torch.float32))
        log_ratio = _log_ratios_2d(model, features, torch.as_tensor(theta))[:, 0]
    log_density = log_ratio.double().numpy().reshape(mesh_x.shape)
    return log_density - np.logaddexp.reduce(log_density, axis=None)


def exact_log_probabilities(
    estimator: LoadedEstimator,
    counts: np.ndarray,
    grid_x: np.ndarray,
    grid_y: np.ndarray,
    truth: np.ndarray,
) -> tuple[np.ndarray, float]:
    """Exact log cell probabilities on the grid (refined cells), and the seconds it took."""
    start = time.perf_counter()
    exact = exact_posterior(estimator.config, counts, grids=(grid_x, grid_y))
    exact = refine_exact_posterior(exact, estimator.config, counts, truths=truth[None])
    log_density = exact.log_density[0]
    return log_density - np.logaddexp.reduce(log_density, axis=None), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimator", required=True, help="amortised fixed-field estimator")
    parser.add_argument("--output", required=True)
    parser.add_argument("--n-observations", type=int, default=3)
    parser.add_argument("--n-simulations", type=int, default=10_000)
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--grid-size", type=int, default=64, help="cells per axis of the box")
    parser.add_argument("--threshold", type=float, default=1e-6, help="see alpnre truncate")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    amortised = load_estimator(args.estimator)
    report = json.loads((amortised.path / "validation" / "report.json").read_text())
    exact_report = report["exact"]
    cells = np.asarray(exact_report["effective_cells"])
    strong = np.flatnonzero(cells < exact_report["min_resolved_cells"])[: args.n_observations]
    log.info("strong-signal observations (of the first %d): %s", len(cells), strong.tolist())
    # The validation's held-out set is simulated in batches of 250 with per-batch seeds.
    held_out = simulate_held_out(amortised.config, 250, report["held_out"]["seed"])
    amortised_jsd = exact_report["jsd_nats"]["values"]

    training = TrainingConfig.model_validate(
        {**amortised.spec.training.model_dump(), "max_epochs": args.max_epochs}
    )
    results: list[dict[str, Any]] = []
    figures = []
    for k in strong.tolist():
        counts = held_out.counts[k]
        truth = {name: float(held_out.theta[name][k]) for name in held_out.theta}
        truth_axes = np.log10([truth["m_neV"], truth["g_per_gev"]])
        try:
            round_ = truncate(
                amortised,
                counts,
                output / f"observation-{k:03d}",
                n_simulations=args.n_simulations,
                batch_size=max(50, args.n_simulations // 10),
                seed=args.seed + k,
                threshold=args.threshold,
                training=training,
                truth=truth,
                progress=False,
            )
        except BoxTooWideError as error:
            # A box with more than 90 % of the prior stops this observation's round only, so
            # the other rounds and the figure are still written.
            log.warning("observation %d: no truncated round: %s", k, error)
            results.append({"observation": k, "skipped": str(error)})
            (output / "results.json").write_text(json.dumps(results, indent=1))
            continue
        truncated = load_estimator(round_.estimator_path)
        marginal = grid_posteriors(truncated, counts[None], args.grid_size)[-1]
        grid_x, grid_y = marginal.grids
        with np.errstate(divide="ignore"):
            truncated_log = np.log(marginal.probabilities[0])
        amortised_log = log_probabilities_on_box(amortised, counts, grid_x, grid_y)
        exact_log, exact_seconds = exact_log_probabilities(
            truncated, counts, grid_x, grid_y, truth_axes
        )
        row = {
            "observation": k,
            "truth": truth,
            "bounds": {name: list(values) for name, values in round_.bounds.items()},
            "prior_fraction": round_.prior_fraction,
            "exact_effective_cells_full_grid": float(cells[k]),
            "jsd_amortised_full_grid": float(amortised_jsd[k]),
            "jsd_amortised_on_box": jensen_shannon_divergence(amortised_log, exact_log),
            "jsd_truncated_on_box": jensen_shannon_divergence(truncated_log, exact_log),
            "seconds": {**round_.seconds, "exact": exact_seconds},
        }
        log.info("observation %d: %s", k, row)
        results.append(row)
        figures.append((k, grid_x, grid_y, amortised_log, truncated_log, exact_log, truth_axes))
        (output / "results.json").write_text(json.dumps(results, indent=1))

    _plot(figures, output / "truncation.png")
    for row in results:
        if "skipped" in row:
            print(f"| {row['observation']} | no round: {row['skipped']} |")
            continue
        print(
            f"| {row['observation']} | {row['prior_fraction']:.2g} | "
            f"{row['jsd_amortised_full_grid']:.3f} | {row['jsd_amortised_on_box']:.3f} | "
            f"{row['jsd_truncated_on_box']:.3f} |"
        )


def _plot(figures: list[tuple], path: Path) -> None:
    from alpnre.validation import hpd_threshold
    from matplotlib.figure import Figure

    if not figures:
        return
    figure = Figure(figsize=(11, 3.4 * len(figures)), layout="constrained")
    axes = figure.subplots(len(figures), 3, squeeze=False)
    titles = ("amortised, on the box", "truncated round", "exact (cell averages)")
    for row, (k, grid_x, grid_y, *logs, truth) in enumerate(figures):
        for column, (log_p, title) in enumerate(zip(logs, titles, strict=True)):
            ax = axes[row, column]
            probabilities = np.exp(log_p)
            ax.pcolormesh(grid_x, grid_y, probabilities.T, cmap="Blues", shading="nearest")
            level = hpd_threshold(probabilities, 0.95)
            ax.contour(grid_x, grid_y, probabilities.T, levels=[level], colors="C1")
            ax.plot(*truth, marker="*", color="C3", markersize=10)
            ax.set_title(f"observation {k}: {title}", fontsize=9)
            ax.set_xlabel("log10(m / neV)")
            ax.set_ylabel("log10(g GeV)")
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
