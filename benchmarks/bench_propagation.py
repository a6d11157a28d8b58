"""Benchmark the propagation kernel against gammaALPs on one core.

Measures, in the same run and for the same energies, parameters and field arrays:

* the propagation step (Perseus ICM only, and the full ICM -> EBL -> GMF path) of
  gammaALPs and of the numba kernel, the numpy fallback and torch on the CPU;
* the generation of one ICM field realisation (gammaALPs' ``Bgaussian.new_Bn`` against
  :func:`alpnre.physics.bfield.icm_cells`);
* ``survival_probability`` end to end with each backend;
* the peak RSS of worker-like subprocesses that compute 20 spectra with each backend;
* on a CUDA device, if there is one, torch throughput for batches of 1024 and 4096.

Prints a markdown table. Run from the repository root:

    python benchmarks/bench_propagation.py
"""

from __future__ import annotations

import os

# One core: set before numpy, numba and torch start their thread pools.
for _variable in (
    "NUMBA_NUM_THREADS",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
from alpnre.config import PropagationConfig, SourceConfig  # noqa: E402
from alpnre.parameters import CLUSTER_PARAMETERS, PARAMETERS  # noqa: E402
from alpnre.physics import bfield  # noqa: E402
from alpnre.physics.alp import ebl_optical_depth, survival_probability  # noqa: E402
from alpnre.physics.propagation import (  # noqa: E402
    AbsorptionStep,
    Cells,
    MixingStep,
    pad_cells,
    propagate,
    propagate_batch_torch,
)

SOURCE = SourceConfig()
M_NEV = 10.0
G11 = 3.0  # 3e-11 GeV^-1
PIN = np.diag((0.5, 0.5, 0.0))
CLUSTER = {name: PARAMETERS[name].default for name in CLUSTER_PARAMETERS}
PARAMS = {**CLUSTER, "m_neV": M_NEV, "g_per_gev": G11 * 1e-11, "ebl_norm": 1.0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-energy", type=int, default=460, help="energies (default 460)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed repeats of the gammaALPs calls (default 3)"
    )
    return parser.parse_args()


def best_time(function: Callable[[], object], repeats: int) -> float:
    """Return the fastest of ``repeats`` wall-clock timings of ``function()`` in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def gammaalps_modules(energy_gev: np.ndarray):
    """gammaALPs ModuleList ICM -> EBL -> GMF for the Perseus model, seed 1."""
    from gammaALPs.core import ALP, ModuleList, Source

    alp = ALP(m=M_NEV, g=G11)
    modules = ModuleList(
        alp,
        Source(z=SOURCE.redshift, ra=SOURCE.ra_deg, dec=SOURCE.dec_deg),
        pin=PIN,
        EGeV=energy_gev,
        log_level="warning",
    )
    modules.add_propagation(
        "ICMGaussTurb",
        0,
        nsim=1,
        seed=1,
        B0=CLUSTER["b0_microgauss"],
        kL=CLUSTER["kl_per_kpc"],
        kH=CLUSTER["kh_per_kpc"],
        q=CLUSTER["q"],
        eta=CLUSTER["eta"],
        n0=CLUSTER["n0_cm3"],
        r_core=CLUSTER["r_core_kpc"],
        beta=CLUSTER["beta"],
        n2=CLUSTER["n2_cm3"],
        r_core2=CLUSTER["r_core2_kpc"],
        beta2=CLUSTER["beta2"],
        r_abell=CLUSTER["r_abell_kpc"],
        chi=None,
        eblnorm=1.0,
    )
    modules.add_propagation("EBL", 1, eblmodel="dominguez", eblnorm=1.0)
    modules.add_propagation("GMF", 2, model="jansson12", chi=None, eblnorm=1.0)
    return modules


def gammaalps_icm_probability(module) -> np.ndarray:
    from gammaALPs.base.transfer import calc_conv_prob

    module.EGeV = module.EGeV  # rebuilds the grids that calc_transfer deletes
    matrices = module.calc_transfer(nsim=0)
    return calc_conv_prob(PIN, np.diag((1.0, 0.0, 0.0)), matrices) + calc_conv_prob(
        PIN, np.diag((0.0, 1.0, 0.0)), matrices
    )


# The worker reads VmHWM from /proc: unlike ru_maxrss, which Linux carries over from the
# parent across fork and exec, VmHWM belongs to the new process image alone.
WORKER_CODE = """
import json, sys, warnings
import numpy as np
warnings.simplefilter("ignore")
from alpnre.config import PropagationConfig, SourceConfig
from alpnre.physics.alp import survival_probability

def high_water_mib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

params, backend, n_energy, n_spectra = json.loads(sys.argv[1])
energy = np.geomspace(0.005, 200.0, n_energy)
survival_probability(energy, params, source=SourceConfig(), ebl_model="dominguez",
                     propagation=PropagationConfig(backend="kernel"), bfield_seed=0)
before = high_water_mib()
for seed in range(n_spectra):
    survival_probability(energy, params, source=SourceConfig(), ebl_model="dominguez",
                         propagation=PropagationConfig(backend=backend), bfield_seed=seed)
print(json.dumps({"after_first_spectrum_mib": before, "peak_mib": high_water_mib()}))
"""


def worker_peak_rss(backend: str, n_energy: int, n_spectra: int) -> dict[str, float]:
    """Peak RSS (MiB) of a fresh process that computes ``n_spectra`` spectra.

    The process first computes one kernel spectrum, so that imports, the EBL table, the
    Galactic cells and the numba kernel are loaded before the baseline is read.
    """
    payload = json.dumps([PARAMS, backend, n_energy, n_spectra])
    output = subprocess.run(
        [sys.executable, "-c", WORKER_CODE, payload],
        check=True,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> int:
    args = parse_args()
    warnings.simplefilter("ignore")
    rows: list[tuple[str, str, str, str]] = []
    energy_tev = np.geomspace(0.005, 200.0, args.n_energy)
    energy_gev = energy_tev * 1e3

    # --- memory ------------------------------------------------------------------------------
    rss_kernel = worker_peak_rss("kernel", args.n_energy, 20)
    rss_reference = worker_peak_rss("gammaalps", args.n_energy, 2)
    memory_rows = [
        (
            "worker peak RSS, gammaalps backend (2 spectra; "
            f"{rss_reference['after_first_spectrum_mib']:.0f} MiB after one kernel spectrum)",
            f"{rss_reference['peak_mib']:.0f} MiB",
            "",
            "1",
        ),
        (
            "worker peak RSS, kernel backend (20 spectra; "
            f"{rss_kernel['after_first_spectrum_mib']:.0f} MiB after the first)",
            f"{rss_kernel['peak_mib']:.0f} MiB",
            "",
            f"{rss_reference['peak_mib'] / rss_kernel['peak_mib']:.1f}x less",
        ),
    ]

    # --- same field arrays for both codes --------------------------------------------
    modules = gammaalps_modules(energy_gev)
    icm_module, gmf_module = modules.modules[0], modules.modules[2]
    icm = Cells(icm_module.B, icm_module.psi, icm_module.nel, icm_module.dL)
    gmf = Cells(gmf_module.B, gmf_module.psi, gmf_module.nel, gmf_module.dL)
    tau = ebl_optical_depth(energy_tev, SOURCE.redshift, "dominguez")
    icm_step = MixingStep(icm, energy_gev * (1.0 + SOURCE.redshift))
    full_steps = [icm_step, AbsorptionStep(np.exp(-tau)), MixingStep(gmf, energy_gev)]
    propagate([icm_step], M_NEV, G11)  # numba compilation or cache load

    size = f"{icm.n_cell} cells x {args.n_energy} energies"
    reference = best_time(lambda: gammaalps_icm_probability(icm_module), args.repeats)
    kernel = best_time(lambda: propagate([icm_step], M_NEV, G11, backend="numba"), 20)
    fallback = best_time(lambda: propagate([icm_step], M_NEV, G11, backend="numpy"), 3)
    difference = np.abs(
        propagate([icm_step], M_NEV, G11)[0] - gammaalps_icm_probability(icm_module)
    ).max()
    rows += [
        (
            f"ICM propagation, gammaALPs ({size})",
            f"{reference * 1e3:.0f} ms",
            f"{1 / reference:.2f}",
            "1",
        ),
        (
            "ICM propagation, numba kernel",
            f"{kernel * 1e3:.1f} ms",
            f"{1 / kernel:.1f}",
            f"{reference / kernel:.0f}",
        ),
        (
            "ICM propagation, numpy fallback",
            f"{fallback * 1e3:.0f} ms",
            f"{1 / fallback:.1f}",
            f"{reference / fallback:.0f}",
        ),
        ("max abs dP kernel vs gammaALPs (ICM)", f"{difference:.1e}", "", ""),
    ]

    def run_modules() -> None:
        modules.run()

    reference_full = best_time(run_modules, args.repeats)
    kernel_full = best_time(lambda: propagate(full_steps, M_NEV, G11), 20)
    modules.run()
    px, py = modules._px_final, modules._py_final
    difference_full = np.abs(propagate(full_steps, M_NEV, G11)[0] - (px + py)[0]).max()
    rows += [
        (
            "ICM+EBL+GMF, gammaALPs ModuleList.run",
            f"{reference_full * 1e3:.0f} ms",
            f"{1 / reference_full:.2f}",
            "1",
        ),
        (
            "ICM+EBL+GMF, numba kernel",
            f"{kernel_full * 1e3:.1f} ms",
            f"{1 / kernel_full:.1f}",
            f"{reference_full / kernel_full:.0f}",
        ),
        ("max abs dP kernel vs gammaALPs (ICM+EBL+GMF)", f"{difference_full:.1e}", "", ""),
    ]

    # --- torch on the CPU ------------------------------------------------------------------
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(1)
        batch = 8
        batch_steps = [
            MixingStep(pad_cells([icm] * batch), icm_step.energy_gev),
            AbsorptionStep(np.exp(-tau)),
            MixingStep(gmf, energy_gev),
        ]
        masses, couplings = np.full(batch, M_NEV), np.full(batch, G11)
        for dtype in ("float64", "float32"):
            seconds = (
                best_time(
                    lambda dtype=dtype: propagate_batch_torch(
                        batch_steps, masses, couplings, dtype=dtype, device="cpu"
                    ),
                    1,
                )
                / batch
            )
            rows.append(
                (
                    f"ICM+EBL+GMF, torch CPU {dtype} (batch {batch})",
                    f"{seconds * 1e3:.0f} ms",
                    f"{1 / seconds:.1f}",
                    f"{reference_full / seconds:.0f}",
                )
            )

    # --- field generation --------------------------------------------------------------
    model = icm_module.Bfield_model
    scale = icm_module.nel_model.Bscale(icm_module.r)
    field_reference = best_time(lambda: model.new_Bn(icm_module.r, Bscale=scale), 5)
    rng = np.random.default_rng(0)
    field_kernel = best_time(lambda: bfield.icm_cells(CLUSTER, rng), 50)
    rows += [
        (
            f"ICM field, gammaALPs Bgaussian.new_Bn ({icm.n_cell} cells)",
            f"{field_reference * 1e3:.1f} ms",
            "",
            "1",
        ),
        (
            "ICM field, alpnre icm_cells (incl. grid, density)",
            f"{field_kernel * 1e3:.2f} ms",
            "",
            f"{field_reference / field_kernel:.0f}",
        ),
    ]

    # --- end to end ------------------------------------------------------------------------
    def spectrum(backend: str, seed: int) -> np.ndarray:
        return survival_probability(
            energy_tev,
            PARAMS,
            source=SOURCE,
            ebl_model="dominguez",
            propagation=PropagationConfig(backend=backend),
            bfield_seed=seed,
        )

    spectrum("kernel", 0)
    end_reference = best_time(lambda: spectrum("gammaalps", 1), args.repeats)
    end_kernel = best_time(lambda: spectrum("kernel", 1), 20)
    rows += [
        (
            "survival_probability, backend gammaalps",
            f"{end_reference * 1e3:.0f} ms",
            f"{1 / end_reference:.2f}",
            "1",
        ),
        (
            "survival_probability, backend kernel",
            f"{end_kernel * 1e3:.1f} ms",
            f"{1 / end_kernel:.1f}",
            f"{end_reference / end_kernel:.0f}",
        ),
    ]

    # --- GPU -------------------------------------------------------------------------------
    if torch is not None and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(0)
        for n_sim in (1024, 4096):
            gpu_steps = [
                MixingStep(pad_cells([icm] * n_sim), icm_step.energy_gev),
                AbsorptionStep(np.exp(-tau)),
                MixingStep(gmf, energy_gev),
            ]
            masses, couplings = np.full(n_sim, M_NEV), np.full(n_sim, G11)
            for dtype in ("float32", "float64"):
                propagate_batch_torch(gpu_steps, masses, couplings, dtype=dtype, device="cuda")
                torch.cuda.synchronize()
                seconds = best_time(
                    lambda dtype=dtype, s=gpu_steps, m=masses, g=couplings: propagate_batch_torch(
                        s, m, g, dtype=dtype, device="cuda"
                    ),
                    2,
                )
                rows.append(
                    (
                        f"ICM+EBL+GMF, torch {device_name} {dtype} (batch {n_sim})",
                        f"{seconds * 1e3:.0f} ms per batch",
                        f"{n_sim / seconds:.0f}",
                        f"{reference_full * n_sim / seconds:.0f}",
                    )
                )

    print(f"machine: {platform.machine()}, {os.cpu_count()} logical CPUs, one thread used")
    print()
    rows += memory_rows
    print("| measurement | time or memory | spectra/s | speed-up over gammaALPs |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
