"""Import gammaALPs without the noise its import makes inside a git work tree.

gammaALPs 0.4.0 computes its version at import time by running ``git describe`` in its
own package folder. When the virtual environment lives inside a git repository (as
``.venv`` does in this project), git finds that repository, has no tag to describe and
prints "fatal: No names found" to the terminal. Setting ``GIT_CEILING_DIRECTORIES`` to
the site-packages folder for the duration of the import stops git from looking above
it, so gammaALPs falls back to its packaged version string.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType

__all__ = ["import_gammaalps"]


def import_gammaalps(module: str = "gammaALPs.core") -> ModuleType:
    """Import a gammaALPs module, keeping git quiet during the first import."""
    spec = importlib.util.find_spec("gammaALPs")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "gammaALPs is not installed: install the project with 'bash scripts/install.sh'"
        )
    site_packages = str(Path(spec.origin).resolve().parents[1])
    previous = os.environ.get("GIT_CEILING_DIRECTORIES")
    os.environ["GIT_CEILING_DIRECTORIES"] = site_packages
    try:
        return importlib.import_module(module)
    finally:
        if previous is None:
            del os.environ["GIT_CEILING_DIRECTORIES"]
        else:
            os.environ["GIT_CEILING_DIRECTORIES"] = previous
