"""``alpnre truncate``: one truncated round for one observation.

Restricts the priors of m and g to where the current estimator's posterior of the
observation is not negligible, simulates there, trains a new estimator and writes the
sharper posterior. See :mod:`alpnre.truncation`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "cmd_truncate"]

log = logging.getLogger("alpnre")


def cmd_truncate(args: argparse.Namespace) -> int:
    """Run one truncated round and log the new bounds and 95 % intervals."""
    from alpnre.cli import _log_posterior_summary, read_observation
    from alpnre.nre import TrainingConfig
    from alpnre.registry import load_estimator, resolve_estimator
    from alpnre.truncation import truncate

    estimator = load_estimator(resolve_estimator(args.estimator, args.registry))
    counts, truth = read_observation(Path(args.observation), args.row)
    training = None
    if args.max_epochs is not None:
        values = estimator.spec.training.model_dump()
        values["max_epochs"] = args.max_epochs
        training = TrainingConfig.model_validate(values)
    result = truncate(
        estimator,
        counts,
        args.output,
        n_simulations=args.n_simulations,
        batch_size=args.batch_size,
        seed=args.seed,
        threshold=args.threshold,
        training=training,
        grid_size=args.grid_size,
        max_prior_fraction=args.max_prior_fraction,
        truth=truth,
        workers=args.workers,
        progress=not args.no_progress,
    )
    log.info(
        "truncated round: %.3g of the prior mass kept, estimator %s",
        result.prior_fraction,
        result.estimator_path,
    )
    _log_posterior_summary(result.posterior)
    return 0


def add_parser(commands: Any) -> None:
    """Register ``alpnre truncate``."""
    from alpnre.cli import _add_common

    parser = commands.add_parser(
        "truncate",
        help="sharpen the posterior of one observation with simulations from a truncated prior",
        description="Restrict the m and g priors to where the estimator's 1-dim posteriors "
        "of the observation exceed --threshold times their peak, simulate there, train a new "
        "estimator and write its posterior of the observation. The new estimator is valid for "
        "this observation only.",
    )
    parser.add_argument("--estimator", required=True, help="estimator folder or registry id")
    parser.add_argument("--registry", default=None, help="registry folder of estimator ids")
    parser.add_argument(
        "--observation", required=True, help="JSON counts file or Parquet batch file"
    )
    parser.add_argument("--row", type=int, default=0, help="row of a Parquet observation")
    parser.add_argument("--output", required=True, help="folder for the round's files")
    parser.add_argument("--n-simulations", type=int, default=10_000, help="default 10000")
    parser.add_argument("--batch-size", type=int, default=1000, help="default 1000")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new simulations")
    parser.add_argument(
        "--threshold",
        type=float,
        default=1e-6,
        help="cut where a 1-dim posterior falls below this fraction of its peak (default 1e-6)",
    )
    parser.add_argument(
        "--max-epochs", type=int, default=None, help="default: the estimator's own setting"
    )
    parser.add_argument("--grid-size", type=int, default=100, help="posterior grid points per axis")
    parser.add_argument(
        "--max-prior-fraction",
        type=float,
        default=0.9,
        help="largest fraction of the prior mass the box may contain; a wider box stops the "
        "command before it simulates (default 0.9)",
    )
    parser.add_argument("--workers", type=int, default=None, help="simulation processes")
    _add_common(parser)
    parser.set_defaults(handler=cmd_truncate)
