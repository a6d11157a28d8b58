"""Validate the propagation kernel against gammaALPs on a grid covering the agnostic prior.

For each cluster point (the prior's centre, its all-low and all-high corners and random
draws) gammaALPs builds the full path ICM -> EBL -> GMF with an explicit seed. The kernel
then propagates through the same field arrays, for every (m, g) of the grid, and the
script prints max |ΔP_γγ| per point. The exit code is 1 when any point exceeds the
tolerance (default 1e-8).

Run from the repository root:

    python scripts/validate_kernel.py --n-random 8 --n-energy 100
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
from alpnre.config import SourceConfig
from alpnre.parameters import CLUSTER_PARAMETERS, PRESETS
from alpnre.physics.alp import ebl_optical_depth
from alpnre.physics.propagation import AbsorptionStep, Cells, MixingStep, propagate

MASSES_NEV = (0.1, 3.0, 100.0)
COUPLINGS_PER_GEV = (0.0, 3e-12, 1e-10)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-random", type=int, default=8, help="random prior draws (default 8)")
    parser.add_argument(
        "--n-energy", type=int, default=100, help="log-spaced energies, 5 GeV-200 TeV (default 100)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of draws and fields (default 0)")
    parser.add_argument(
        "--ebl-model", default="dominguez", help="ebltable model (default dominguez)"
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-8, help="maximum allowed |ΔP| (default 1e-8)"
    )
    return parser.parse_args()


def cluster_points(n_random: int, rng: np.random.Generator) -> list[tuple[str, dict[str, float]]]:
    """Centre, all-low corner, all-high corner and random draws of the agnostic prior."""
    bounds = {
        name: (PRESETS["agnostic"][name]["low"], PRESETS["agnostic"][name]["high"])
        for name in CLUSTER_PARAMETERS
    }
    points = [
        ("centre", {name: 0.5 * (low + high) for name, (low, high) in bounds.items()}),
        ("low corner", {name: low for name, (low, _) in bounds.items()}),
        ("high corner", {name: high for name, (_, high) in bounds.items()}),
    ]
    for i in range(n_random):
        points.append(
            (f"random {i}", {name: rng.uniform(low, high) for name, (low, high) in bounds.items()})
        )
    return points


def build_gammaalps(
    cluster: dict[str, float],
    energy_gev: np.ndarray,
    source: SourceConfig,
    ebl_model: str,
    seed: int,
):
    """gammaALPs ModuleList ICM -> EBL -> GMF with every parameter explicit."""
    from gammaALPs.core import ALP, ModuleList, Source

    alp = ALP(m=1.0, g=1.0)
    modules = ModuleList(
        alp,
        Source(z=source.redshift, ra=source.ra_deg, dec=source.dec_deg),
        pin=np.diag((0.5, 0.5, 0.0)),
        EGeV=energy_gev,
        log_level="warning",
    )
    modules.add_propagation(
        "ICMGaussTurb",
        0,
        nsim=1,
        seed=seed,
        B0=cluster["b0_microgauss"],
        kL=cluster["kl_per_kpc"],
        kH=cluster["kh_per_kpc"],
        q=cluster["q"],
        kMin=-1.0,
        dkType="log",
        dkSteps=0,
        eta=cluster["eta"],
        n0=cluster["n0_cm3"],
        r_core=cluster["r_core_kpc"],
        beta=cluster["beta"],
        n2=cluster["n2_cm3"],
        r_core2=cluster["r_core2_kpc"],
        beta2=cluster["beta2"],
        r_abell=cluster["r_abell_kpc"],
        chi=None,
        eblnorm=1.0,
    )
    modules.add_propagation("EBL", 1, eblmodel=ebl_model, eblnorm=1.0)
    modules.add_propagation("GMF", 2, model="jansson12", chi=None, eblnorm=1.0)
    return alp, modules


def kernel_steps(modules, energy_gev: np.ndarray, tau: np.ndarray, redshift: float) -> list:
    icm, gmf = modules.modules[0], modules.modules[2]
    return [
        MixingStep(Cells(icm.B, icm.psi, icm.nel, icm.dL), energy_gev * (1.0 + redshift)),
        AbsorptionStep(np.exp(-tau)),
        MixingStep(Cells(gmf.B, gmf.psi, gmf.nel, gmf.dL), energy_gev),
    ]


def main() -> int:
    args = parse_args()
    rng = np.random.default_rng(args.seed)
    source = SourceConfig()
    energy_gev = np.geomspace(5.0, 2e5, args.n_energy)
    tau = ebl_optical_depth(energy_gev / 1e3, source.redshift, args.ebl_model)

    print("| point | cells | m [neV] | g [GeV^-1] | max abs dP | gammaALPs [s] | kernel [s] |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    worst = (0.0, "")
    n_checked = 0
    for label, cluster in cluster_points(args.n_random, rng):
        alp, modules = build_gammaalps(cluster, energy_gev, source, args.ebl_model, args.seed)
        n_cells = modules.modules[0].B.size
        for m_nev in MASSES_NEV:
            for g_per_gev in COUPLINGS_PER_GEV:
                alp.m, alp.g = m_nev, g_per_gev * 1e11
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    p_x, p_y, _ = modules.run()
                reference_s = time.perf_counter() - start

                start = time.perf_counter()
                p_photon, _ = propagate(
                    kernel_steps(modules, energy_gev, tau, source.redshift), m_nev, g_per_gev * 1e11
                )
                kernel_s = time.perf_counter() - start

                difference = float(np.abs(p_photon - (p_x + p_y)[0]).max())
                n_checked += 1
                if difference > worst[0]:
                    worst = (difference, f"{label}, m={m_nev:g} neV, g={g_per_gev:g} GeV^-1")
                print(
                    f"| {label} | {n_cells} | {m_nev:g} | {g_per_gev:g} | {difference:.2e} | "
                    f"{reference_s:.2f} | {kernel_s:.4f} |",
                    flush=True,
                )

    passed = worst[0] <= args.tolerance
    print()
    print(f"checked {n_checked} grid points at {args.n_energy} energies")
    print(f"max |dP| = {worst[0]:.3e} ({worst[1] or 'all zero'}); tolerance {args.tolerance:g}")
    print("PASSED" if passed else "FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
