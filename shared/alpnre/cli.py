"""The ``alpnre`` command: simulate, train, query posteriors, run the demo.

Each sub-command is a thin layer over the library; run ``alpnre COMMAND --help`` for
its options.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("alpnre")

DEFAULT_CONFIG = "ngc1275_cta_north_50h"


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("gamma_alps", "matplotlib", "numba", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, allow_nan=False))


# --- simulate -------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    from alpnre.config import load_config
    from alpnre.runs import simulate_run

    config = load_config(args.config)
    manifest = simulate_run(
        config,
        args.output,
        n_simulations=args.n_simulations,
        batch_size=args.batch_size,
        run_seed=args.seed,
        workers=args.workers,
        progress=not args.no_progress,
    )
    log.info("run %s: %d spectra in %s", manifest.run_id, manifest.n_rows, args.output)
    return 0


# --- train ----------------------------------------------------------------------------


def _training_config(args: argparse.Namespace) -> Any:
    from alpnre.nre import TrainingConfig

    values: dict[str, Any] = {}
    if args.hyperparameters:
        import yaml

        values.update(yaml.safe_load(Path(args.hyperparameters).read_text()) or {})
    for key in ("max_epochs", "batch_size", "learning_rate", "seed", "device", "bnre_lambda"):
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    if args.drop_nonfinite:
        values["drop_nonfinite"] = True
    if args.nuisance_marginals:
        values["nuisance_marginals"] = args.nuisance_marginals
    return TrainingConfig.model_validate(values)


def cmd_train(args: argparse.Namespace) -> int:
    from alpnre.training import train_and_save

    training = _training_config(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    folder = train_and_save(
        args.data, args.output, training, progress=not args.no_progress, registry=args.registry
    )
    log.info("estimator saved to %s", folder)
    return 0


# --- posterior ------------------------------------------------------------------------


def read_observation(path: Path, row: int) -> tuple[list[float], dict[str, float] | None]:
    """Read counts from a JSON list (or {"counts": [...]}) or one row of a Parquet file.

    Returns the counts and, for a simulated row, its true parameters.
    """
    if not path.exists():
        raise FileNotFoundError(f"observation file {path} not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if not 0 <= row < table.num_rows:
            raise ValueError(f"{path} has {table.num_rows} rows; --row {row} is out of range")
        record = table.slice(row, 1).to_pylist()[0]
        truth = {
            key: float(value)
            for key, value in record.items()
            if key not in ("counts", "npred", "sim_index", "theta_index", "bfield_seed")
        }
        return list(record["counts"]), truth
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"observation file {path} is not valid JSON: {error}") from None
    if isinstance(payload, dict):
        if "counts" not in payload:
            raise ValueError(f"{path}: a JSON object observation needs a 'counts' list")
        return list(payload["counts"]), payload.get("truth")
    return list(payload), None


def cmd_posterior(args: argparse.Namespace) -> int:
    from alpnre.posterior import compute_posterior, plot_posterior
    from alpnre.registry import load_estimator, resolve_estimator

    estimator = load_estimator(resolve_estimator(args.estimator, args.registry))
    counts, truth = read_observation(Path(args.observation), args.row)
    posterior = compute_posterior(
        estimator, counts, grid_size=args.grid_size, levels=args.levels, truth=truth
    )
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    _write_json(output / "posterior.json", posterior.to_dict())
    plot_posterior(posterior, str(output / "posterior.png"))
    _log_posterior_summary(posterior)
    log.info("wrote %s and %s", output / "posterior.json", output / "posterior.png")
    return 0


def _log_posterior_summary(posterior: Any) -> None:
    for marginal in posterior.one_dim.values():
        intervals = marginal.interval(0.95)
        log.info(
            "%s: MAP %.3f, mean %.3f, 95%% HPD %s",
            marginal.label,
            marginal.map,
            marginal.mean,
            ", ".join(f"[{a:.2f}, {b:.2f}]" for a, b in intervals),
        )


# --- demo -----------------------------------------------------------------------------


DEMO_TRUTH = {"m_neV": 30.0, "g_per_gev": 5e-11}


def cmd_demo(args: argparse.Namespace) -> int:
    from alpnre.training import train_and_save

    """Simulate, train, and infer the ALP parameters of a mock observation with a signal."""
    import numpy as np

    from alpnre.config import load_config
    from alpnre.nre import TrainingConfig
    from alpnre.physics.irf import load_instrument_response
    from alpnre.runs import simulate_run
    from alpnre.simulate import expected_counts

    start = time.perf_counter()
    output = Path(args.output)
    config = load_config(args.config)
    # load_instrument_response warns once when it falls back to the approximate IRF.
    instrument = load_instrument_response(config)

    # 1. Simulations from the prior.
    log.info("step 1/4: %d simulations", args.n_simulations)
    simulate_run(
        config,
        output / "simulations",
        n_simulations=args.n_simulations,
        batch_size=args.batch_size,
        run_seed=args.seed,
        workers=args.workers,
        progress=not args.no_progress,
    )

    # 2. Training.
    log.info("step 2/4: training the ratio estimator")
    training = TrainingConfig(max_epochs=args.max_epochs, seed=args.seed, patience=6)
    folder = train_and_save(
        [output / "simulations"], output, training, progress=not args.no_progress
    )

    # 3. A mock observation with an injected ALP signal.
    log.info("step 3/4: mock observation with m = %g neV, g = %g GeV^-1", *DEMO_TRUTH.values())
    rng = np.random.default_rng(args.seed + 1)
    truth = {name: float(config.prior(name).sample(rng, 1)[0]) for name in config.parameter_names}
    truth.update(DEMO_TRUTH)
    truth.update({"phi0_per_cm2_s_tev": 1.54e-9, "gamma": 2.11, "ecut_tev": 0.54})
    params = {name: np.array([value]) for name, value in truth.items()}
    npred = expected_counts(config, instrument, params, np.array([rng.integers(2**63)]))
    counts = rng.poisson(npred[0]).astype(int).tolist()
    observation = output / "observation.json"
    _write_json(observation, {"counts": counts, "truth": truth})

    # 4. Posterior.
    log.info("step 4/4: posterior")
    posterior_args = argparse.Namespace(
        estimator=str(folder),
        registry=None,
        observation=str(observation),
        row=0,
        grid_size=100,
        levels=[0.68, 0.95],
        output=str(output),
    )
    cmd_posterior(posterior_args)
    log.info(
        "demo finished in %.1f min: see %s/posterior.png",
        (time.perf_counter() - start) / 60,
        output,
    )
    return 0


# --- parser ---------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alpnre",
        description="Limits on axion-like particles from gamma-ray spectra of NGC 1275 with "
        "neural ratio estimation.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser("simulate", help="simulate spectra into Parquet batch files")
    simulate.add_argument(
        "--config", default=DEFAULT_CONFIG, help="YAML file or shipped config name"
    )
    simulate.add_argument("--n-simulations", type=int, required=True, help="number of spectra")
    simulate.add_argument("--batch-size", type=int, default=1000, help="spectra per Parquet file")
    simulate.add_argument("--seed", type=int, default=0, help="run seed (reproduces the run)")
    simulate.add_argument("--output", type=Path, required=True, help="run folder to write")
    simulate.add_argument("--workers", type=int, default=None, help="processes (default: cores)")
    _add_common(simulate)
    simulate.set_defaults(handler=cmd_simulate)

    train = commands.add_parser("train", help="train a ratio estimator on simulation runs")
    train.add_argument("--data", type=Path, nargs="+", required=True, help="simulation run folders")
    train.add_argument("--output", type=Path, required=True, help="folder for the estimator")
    train.add_argument(
        "--registry", type=Path, default=None, help="also publish into this registry"
    )
    train.add_argument("--hyperparameters", default=None, help="YAML file of TrainingConfig values")
    train.add_argument("--max-epochs", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--learning-rate", type=float, default=None)
    train.add_argument("--bnre-lambda", type=float, default=None, help="0 gives plain NRE")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    train.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads on the CPU (default: one per core); 1 is often several times "
        "faster while other processes keep the cores busy",
    )
    train.add_argument(
        "--nuisance-marginals",
        nargs="*",
        default=None,
        help="nuisance parameters that get their own 1-dim estimator",
    )
    train.add_argument(
        "--drop-nonfinite",
        action="store_true",
        help="exclude rows with NaN/inf (counted and recorded) instead of failing",
    )
    _add_common(train)
    train.set_defaults(handler=cmd_train)

    posterior = commands.add_parser("posterior", help="posterior of an observed spectrum")
    posterior.add_argument(
        "--estimator",
        required=True,
        help="estimator folder, or an id / latest:<config> with --registry",
    )
    posterior.add_argument("--registry", type=Path, default=None)
    posterior.add_argument(
        "--observation",
        required=True,
        help="JSON list of counts, {'counts': [...]}, or a Parquet batch file",
    )
    posterior.add_argument("--row", type=int, default=0, help="row of a Parquet observation")
    posterior.add_argument("--grid-size", type=int, default=100, help="grid points per parameter")
    posterior.add_argument(
        "--levels",
        type=float,
        nargs="+",
        default=[0.68, 0.95],
        help="credibility levels of the HPD regions",
    )
    posterior.add_argument(
        "--output", type=Path, required=True, help="folder for posterior.json and posterior.png"
    )
    _add_common(posterior)
    posterior.set_defaults(handler=cmd_posterior)

    demo = commands.add_parser("demo", help="simulate, train and infer on a mock observation")
    demo.add_argument("--output", type=Path, default=Path("demo-output"))
    demo.add_argument("--config", default=DEFAULT_CONFIG)
    demo.add_argument("--n-simulations", type=int, default=20000)
    demo.add_argument("--batch-size", type=int, default=1000)
    demo.add_argument("--max-epochs", type=int, default=30)
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--workers", type=int, default=None)
    _add_common(demo)
    demo.set_defaults(handler=cmd_demo)

    _add_module_commands(commands)
    return parser


# Sub-commands that live in their own modules; each module defines
# ``add_parser(commands)`` that registers its parser with a ``handler`` default.
COMMAND_MODULES = (
    "alpnre.commands.validate",
    "alpnre.commands.limits",
    "alpnre.commands.stack",
    "alpnre.commands.registry",
    "alpnre.commands.truncate",
)


def _add_module_commands(commands: Any) -> None:
    import importlib

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        module.add_parser(commands)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    os.environ.setdefault("MPLBACKEND", "Agg")
    from alpnre.config import ConfigError
    from alpnre.dataset import DatasetError
    from alpnre.registry import EstimatorNotFoundError

    try:
        return int(args.handler(args))
    except (
        ConfigError,
        DatasetError,
        EstimatorNotFoundError,
        FileNotFoundError,
        ValueError,
    ) as error:
        log.error("%s", error)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; finished batches and checkpoints are kept, rerun to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
