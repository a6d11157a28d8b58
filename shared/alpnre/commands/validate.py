"""``alpnre validate``: calibration of an estimator on held-out simulations.

Simulates fresh spectra from the estimator's config, checks the HPD coverage of every
marginal and TARP on (log10 m, log10 g), and, with ``--exact``, compares with the exact
posterior of configs that have one. Writes ``validation/report.json`` and the figures
into the estimator folder. See :mod:`alpnre.calibration` for the method.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

__all__ = ["add_parser", "cmd_validate"]

log = logging.getLogger("alpnre")


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate an estimator, write its report and figures, and print a summary."""
    from alpnre.calibration import validate_estimator
    from alpnre.registry import resolve_estimator

    folder = resolve_estimator(args.estimator, args.registry)
    # Options left out keep the defaults of validate_estimator.
    options = {
        "n_simulations": args.n,
        "seed": args.seed,
        "grid_size": args.grid_size,
        "grid_size_1d": args.grid_size_1d,
        "n_posterior_samples": args.n_samples,
        "n_exact": args.n_exact,
        "exact_grid_size": args.exact_grid_size,
        "exact_subcells": args.exact_subcells,
    }
    report = validate_estimator(
        folder,
        exact=args.exact,
        progress=not args.no_progress,
        **{key: value for key, value in options.items() if value is not None},
    )
    print(report.summary())
    return 0


def add_parser(commands: Any) -> None:
    """Register ``alpnre validate``."""
    from alpnre.cli import _add_common

    parser = commands.add_parser(
        "validate",
        help="check the calibration of an estimator on held-out simulations",
        description="Simulate held-out spectra from the estimator's config, compute the "
        "expected coverage of HPD regions and TARP, and write validation/report.json, "
        "coverage.png and tarp.png into the estimator folder.",
    )
    parser.add_argument(
        "--estimator",
        required=True,
        help="estimator folder, or an id / latest:<config> with --registry",
    )
    parser.add_argument("--registry", default=None, help="registry folder of estimator ids")
    parser.add_argument("--n", type=int, default=None, help="held-out simulations (default 1000)")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the held-out simulations (default: derived from the estimator checksum)",
    )
    parser.add_argument(
        "--grid-size",
        type=int,
        default=None,
        help="posterior grid cells per parameter axis (default 64)",
    )
    parser.add_argument(
        "--grid-size-1d",
        type=int,
        default=None,
        help="cells of the 1-dim posterior grids (default: the larger of --grid-size and 1024)",
    )
    parser.add_argument(
        "--n-samples",
        type=int,
        default=None,
        help="posterior samples per simulation for TARP (default 1000)",
    )
    parser.add_argument(
        "--exact",
        action="store_true",
        help="also compare with the exact posterior (needs fixed cluster parameters and "
        "propagation.fixed_bfield_seed in the config) and write exact.png",
    )
    parser.add_argument(
        "--n-exact",
        type=int,
        default=None,
        help="held-out simulations compared with the exact posterior (default 50)",
    )
    parser.add_argument(
        "--exact-grid-size",
        type=int,
        default=None,
        help="(m, g) nodes per axis of the exact posterior, interpolated onto the NRE grid "
        "(default: the NRE grid's cell centres, no interpolation)",
    )
    parser.add_argument(
        "--exact-subcells",
        type=int,
        default=None,
        help="sub-nodes per axis in the cells where an exact posterior is narrower than a "
        "cell; there the exact and the NRE posterior both get the cell's mean density "
        "(default 6; 0 keeps the node values)",
    )
    _add_common(parser)
    parser.set_defaults(handler=cmd_validate)
