"""``alpnre limits``: expected exclusion limits of an estimator under the no-ALP hypothesis.

Simulates mock observations without ALPs on this machine (a local process pool) and
computes each mock's 95 % upper-limit curve on g versus m. The median with its 68 % and
95 % bands goes to ``expected_limits.json``, and a figure over published limits to
``expected_limits.png``. See :mod:`alpnre.limits` for the method.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "cmd_limits"]

log = logging.getLogger("alpnre")


def cmd_limits(args: argparse.Namespace) -> int:
    """Compute expected limits and write the JSON summary and the figure."""
    import matplotlib.pyplot as plt

    from alpnre.config import load_config
    from alpnre.limits import compute_expected_limits, load_published_limits, plot_expected_limits
    from alpnre.registry import load_estimator, resolve_estimator

    estimator = load_estimator(resolve_estimator(args.estimator, args.registry))
    config = load_config(args.config) if args.config else estimator.config
    log.info(
        "expected limits of estimator %s: %d no-ALP mocks of config %s",
        estimator.estimator_id,
        args.n_mocks,
        config.name,
    )
    result = compute_expected_limits(
        config,
        estimator,
        n_mocks=args.n_mocks,
        seed=args.seed,
        grid_size=args.grid_size,
        level=args.level,
        workers=args.workers,
        run_dir=args.keep_run,
    )

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    summary = output / "expected_limits.json"
    summary.write_text(
        json.dumps(result.to_dict(include_curves=args.include_curves), indent=1, allow_nan=False)
    )
    figure = plot_expected_limits(result, load_published_limits(), output / "expected_limits.png")
    plt.close(figure)
    _log_summary(result)
    log.info("wrote %s and %s", summary, output / "expected_limits.png")
    return 0


def _log_summary(result: Any) -> None:
    median = result.median
    best = int(median.argmin()) if median.size else 0
    log.info(
        "median expected %.0f%% limit: lowest g = %.3g GeV^-1 at m = %.3g neV",
        100 * result.level,
        10.0 ** median[best],
        10.0 ** result.log10_mass_grid[best],
    )


def add_parser(commands: Any) -> None:
    """Register ``alpnre limits``."""
    from alpnre.cli import _add_common

    parser = commands.add_parser(
        "limits", help="expected limits on g versus m from mock observations without ALPs"
    )
    parser.add_argument(
        "--estimator",
        required=True,
        help="estimator folder, or an id / latest:<config> with --registry",
    )
    parser.add_argument("--registry", type=Path, default=None, help="registry folder")
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file or shipped config of the mocks; default: the estimator's own config",
    )
    parser.add_argument("--n-mocks", type=int, required=True, help="number of mock observations")
    parser.add_argument("--seed", type=int, default=0, help="run seed of the mocks")
    parser.add_argument("--grid-size", type=int, default=100, help="grid points per parameter")
    parser.add_argument(
        "--level", type=float, default=0.95, help="credibility level of the upper limits"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="simulation processes (1: in this process)"
    )
    parser.add_argument(
        "--keep-run",
        type=Path,
        default=None,
        help="keep the mock simulation run in this folder (default: a deleted temporary one)",
    )
    parser.add_argument(
        "--include-curves",
        action="store_true",
        help="also write every mock's limit curve to the JSON file",
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="folder for expected_limits.json and .png"
    )
    _add_common(parser)
    parser.set_defaults(handler=cmd_limits)
