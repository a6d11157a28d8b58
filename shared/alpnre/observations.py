"""Observed count spectra x_o from files, simulation runs and request bodies.

Three sources give the counts per reconstructed-energy bin that a posterior query needs:

- an OGIP PHA file (``SPECTRUM`` table with a ``COUNTS`` column and an ``EBOUNDS``
  table with the energy edges), read with gammapy's ``RegionNDMap`` reader;
- a gammapy ``SpectrumDatasetOnOff`` in the GADF serialisation (``COUNTS`` and
  ``COUNTS_BANDS`` HDUs), of which the ON counts are used;
- one row of a simulation run, which also carries the true parameters.

The estimator was trained on ON-region counts that include the expected background,
so the OFF counts of a dataset are not used. A file whose energy axis differs from the
estimator's binning is rejected, because the network reads bin i as a fixed energy.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from alpnre.dataset import DatasetError, read_manifest

__all__ = [
    "ENERGY_EDGES_RTOL",
    "Observation",
    "ObservationError",
    "check_energy_edges",
    "estimator_energy_edges",
    "read_simulation_row",
    "read_spectrum_file",
]

log = logging.getLogger(__name__)

# Relative tolerance of the comparison of energy edges. FITS tables store edges as
# float64 (gammapy) or float32 (some OGIP writers), and float32 keeps about 7 digits.
ENERGY_EDGES_RTOL = 1e-5

# Parquet columns of a simulation row that are not parameters.
_NON_PARAMETER_COLUMNS = ("sim_index", "theta_index", "bfield_seed", "npred", "counts")


class ObservationError(ValueError):
    """An observation that cannot be used; the message names the file or row and the fix."""


@dataclass
class Observation:
    """An observed count spectrum with where it came from.

    Attributes
    ----------
    counts
        Counts per reconstructed-energy bin, shape (n_bins,), not yet checked.
    source
        ``"counts"``, ``"ogip_pha"``, ``"spectrum_dataset"`` or ``"simulation"``.
    name
        File name, ``<run_id>[<row>]`` or a name given by the caller.
    energy_edges_tev
        Energy edges read from the file, shape (n_bins + 1,); None for plain counts.
    truth
        True parameter values (physical units) of a simulated row, else None.
    notes
        Facts about the input that a caller should see, e.g. bins a file marks unsafe.
    """

    counts: np.ndarray
    source: str
    name: str
    energy_edges_tev: np.ndarray | None = None
    truth: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """JSON-safe summary of the input: source, name, bins, energy range, notes."""
        summary: dict[str, Any] = {
            "source": self.source,
            "name": self.name,
            "n_bins": int(np.size(self.counts)),
            "notes": list(self.notes),
        }
        if self.energy_edges_tev is not None:
            summary["energy_min_tev"] = float(self.energy_edges_tev[0])
            summary["energy_max_tev"] = float(self.energy_edges_tev[-1])
        return summary


def estimator_energy_edges(metadata: dict[str, Any], config: Any) -> np.ndarray:
    """Reconstructed-energy edges of an estimator in TeV, shape (n_bins + 1,).

    Estimators trained through ``alpnre train`` record the edges of their training data
    in the metadata field ``energy_edges_tev``. Otherwise they are derived from the
    analysis config, which is how the simulator builds them.
    """
    recorded = metadata.get("energy_edges_tev")
    if recorded:
        return np.asarray(recorded, dtype=float)
    return np.asarray(config.observation.energy_edges_tev(), dtype=float)


def check_energy_edges(edges_tev: np.ndarray, expected_tev: np.ndarray, name: str) -> None:
    """Raise :class:`ObservationError` unless two energy binnings agree.

    Edges agree when they have the same length and every edge is within
    :data:`ENERGY_EDGES_RTOL` of the expected one.
    """
    edges = np.asarray(edges_tev, dtype=float)
    expected = np.asarray(expected_tev, dtype=float)
    wanted = (
        f"the estimator expects {expected.size - 1} bins from {expected[0]:.6g} to "
        f"{expected[-1]:.6g} TeV (log-spaced as in its analysis config); rebin the spectrum "
        "to that axis"
    )
    if edges.shape != expected.shape:
        raise ObservationError(
            f"{name}: energy axis has {edges.size - 1} bins from {edges[0]:.6g} to "
            f"{edges[-1]:.6g} TeV, but {wanted}"
        )
    deviation = np.abs(edges / expected - 1.0)
    if not np.all(deviation <= ENERGY_EDGES_RTOL):
        worst = int(np.argmax(deviation))
        raise ObservationError(
            f"{name}: energy edge {worst} is {edges[worst]:.6g} TeV where the estimator has "
            f"{expected[worst]:.6g} TeV (relative difference {deviation[worst]:.2g}); {wanted}"
        )


def read_spectrum_file(source: bytes | str | Path, name: str | None = None) -> Observation:
    """Read the counts and energy edges of an OGIP PHA or GADF ``SpectrumDatasetOnOff`` file.

    Parameters
    ----------
    source
        File content (e.g. an upload) or a path.
    name
        Name used in messages; default: the path, or ``"uploaded file"``.

    Raises
    ------
    ObservationError
        When the content is not FITS, or contains no single-region count spectrum with
        an energy axis.
    """
    from astropy.io import fits

    if isinstance(source, bytes):
        label = name or "uploaded file"
        opened: Any = io.BytesIO(source)
    else:
        label = name or str(source)
        opened = str(source)
    try:
        hdulist = fits.open(opened, memmap=False)
    except (OSError, ValueError, TypeError) as error:
        raise ObservationError(
            f"{label}: not a FITS file ({error}); upload an OGIP PHA spectrum or a gammapy "
            "SpectrumDatasetOnOff written with dataset.write()"
        ) from None
    with hdulist:
        names = [hdu.name for hdu in hdulist]
        try:
            if "SPECTRUM" in names:
                return _read_ogip_pha(hdulist, label)
            if "COUNTS" in names and "COUNTS_BANDS" in names:
                return _read_spectrum_dataset(hdulist, label)
        except ObservationError:
            raise
        except (KeyError, ValueError, TypeError, IndexError) as error:
            raise ObservationError(f"{label}: cannot read the spectrum: {error}") from None
    raise ObservationError(
        f"{label}: not a spectrum; expected an OGIP PHA file (SPECTRUM and EBOUNDS "
        "extensions) or a gammapy SpectrumDatasetOnOff file (COUNTS and COUNTS_BANDS "
        f"extensions), found the HDUs {names}"
    )


def _read_ogip_pha(hdulist: Any, label: str) -> Observation:
    from gammapy.maps import RegionNDMap

    names = [hdu.name for hdu in hdulist]
    columns = hdulist["SPECTRUM"].columns.names
    if "COUNTS" not in columns:
        raise ObservationError(
            f"{label}: the SPECTRUM table has the columns {columns} but no COUNTS; a PHA "
            "file with RATE instead of COUNTS cannot be used, give observed event counts"
        )
    if "EBOUNDS" not in names:
        raise ObservationError(
            f"{label}: the PHA file has no EBOUNDS extension, so its energy axis cannot be "
            "checked against the estimator's; add EBOUNDS (E_MIN, E_MAX per channel), e.g. "
            "by writing the spectrum with gammapy"
        )
    counts_map = RegionNDMap.from_hdulist(hdulist, format="ogip")
    counts = _single_region_counts(counts_map, label)
    notes = []
    if "QUALITY" in columns:
        quality = np.asarray(hdulist["SPECTRUM"].data["QUALITY"])
        bad = int(np.count_nonzero(quality))
        if bad:
            notes.append(
                f"{bad} channels have a non-zero QUALITY flag; their counts are used "
                "anyway, because the estimator was trained on every bin"
            )
    return Observation(
        counts=counts,
        source="ogip_pha",
        name=label,
        energy_edges_tev=_energy_edges_tev(counts_map),
        notes=notes,
    )


def _read_spectrum_dataset(hdulist: Any, label: str) -> Observation:
    from gammapy.datasets import SpectrumDatasetOnOff

    dataset = SpectrumDatasetOnOff.from_hdulist(hdulist)
    counts = _single_region_counts(dataset.counts, label)
    notes = []
    if dataset.mask_safe is not None:
        unsafe = int(np.count_nonzero(~np.asarray(dataset.mask_safe.data, dtype=bool)))
        if unsafe:
            notes.append(
                f"mask_safe excludes {unsafe} energy bins; their counts are used anyway, "
                "because the estimator was trained on every bin"
            )
    return Observation(
        counts=counts,
        source="spectrum_dataset",
        name=label,
        energy_edges_tev=_energy_edges_tev(dataset.counts),
        notes=notes,
    )


def _single_region_counts(counts_map: Any, label: str) -> np.ndarray:
    """Counts of a region map as shape (n_energy,), rejecting maps with other axes."""
    axis_names = list(counts_map.geom.axes.names)
    if axis_names != ["energy"]:
        raise ObservationError(
            f"{label}: the counts have the non-spatial axes {axis_names}; expected one "
            "reconstructed-energy axis named 'energy'"
        )
    data = np.asarray(counts_map.data, dtype=float)
    n_energy = counts_map.geom.axes["energy"].nbin
    if data.size != n_energy:
        raise ObservationError(
            f"{label}: the counts have shape {data.shape}; expected one region with "
            f"{n_energy} energy bins"
        )
    return data.reshape(n_energy)


def _energy_edges_tev(counts_map: Any) -> np.ndarray:
    edges = counts_map.geom.axes["energy"].edges
    return np.asarray(edges.to_value("TeV"), dtype=float)


def read_simulation_row(run_dir: str | Path, row: int) -> Observation:
    """Read row ``row`` of a simulation run (0-based over the whole run) with its truth.

    Raises
    ------
    ObservationError
        When the row is outside the run or its batch file is not written yet.
    DatasetError
        When the folder contains no valid run manifest.
    """
    manifest = read_manifest(run_dir)
    if not 0 <= row < manifest.n_simulations:
        raise ObservationError(
            f"row {row} is outside run {manifest.run_id}, which has {manifest.n_simulations} "
            f"rows (0 to {manifest.n_simulations - 1})"
        )
    batch_index, offset = divmod(row, manifest.batch_size)
    records = {record.batch_index: record for record in manifest.batches}
    if batch_index not in records:
        raise ObservationError(
            f"row {row} of run {manifest.run_id} is in batch {batch_index}, which is not "
            "written yet; wait for the run to finish or choose a row of a finished batch"
        )
    path = Path(run_dir) / records[batch_index].file
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path}: cannot read the batch file: {error}") from None
    record = table.slice(offset, 1).to_pylist()[0]
    truth = {
        key: float(value) for key, value in record.items() if key not in _NON_PARAMETER_COLUMNS
    }
    return Observation(
        counts=np.asarray(record["counts"], dtype=float),
        source="simulation",
        name=f"{manifest.run_id}[{row}]",
        energy_edges_tev=np.asarray(manifest.energy_edges_tev, dtype=float),
        truth=truth,
    )
