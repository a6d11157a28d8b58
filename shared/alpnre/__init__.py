"""alpnre: limits on axion-like particles from gamma-ray spectra with neural ratio estimation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("alpnre")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
