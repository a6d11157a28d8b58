"""Prior distributions of the simulator parameters.

Each prior is a small pydantic model (so it validates itself when a YAML config is
loaded) with three operations: ``sample`` with a :class:`numpy.random.Generator`,
``log_prob`` and ``support``. Parameters of interest and nuisances share these models.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import stats

__all__ = [
    "FixedPrior",
    "LogUniformPrior",
    "NormalPrior",
    "Prior",
    "TruncatedNormalPrior",
    "UniformPrior",
]


class _PriorBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @property
    def is_fixed(self) -> bool:
        return False

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        raise NotImplementedError

    def log_prob(self, value: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def support(self) -> tuple[float, float]:
        """Return the (lower, upper) bounds of the support; infinite where unbounded."""
        raise NotImplementedError


class UniformPrior(_PriorBase):
    """Uniform density on [low, high]."""

    kind: Literal["uniform"] = "uniform"
    low: float
    high: float

    @model_validator(mode="after")
    def _check_bounds(self) -> UniformPrior:
        if not self.low < self.high:
            raise ValueError(
                f"uniform prior needs low < high, got low={self.low}, high={self.high}: "
                "swap the bounds or use kind 'fixed' for a single value"
            )
        return self

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return rng.uniform(self.low, self.high, size)

    def log_prob(self, value: np.ndarray) -> np.ndarray:
        value = np.asarray(value, dtype=float)
        inside = (value >= self.low) & (value <= self.high)
        return np.where(inside, -math.log(self.high - self.low), -np.inf)

    def support(self) -> tuple[float, float]:
        return (self.low, self.high)


class LogUniformPrior(_PriorBase):
    """Density uniform in log10(value) on [low, high], both strictly positive."""

    kind: Literal["log_uniform"] = "log_uniform"
    low: float
    high: float

    @model_validator(mode="after")
    def _check_bounds(self) -> LogUniformPrior:
        if self.low <= 0:
            raise ValueError(
                f"log_uniform prior needs low > 0, got low={self.low}: "
                "use kind 'uniform' for ranges that include zero"
            )
        if not self.low < self.high:
            raise ValueError(
                f"log_uniform prior needs low < high, got low={self.low}, high={self.high}: "
                "swap the bounds or use kind 'fixed' for a single value"
            )
        return self

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return 10.0 ** rng.uniform(math.log10(self.low), math.log10(self.high), size)

    def log_prob(self, value: np.ndarray) -> np.ndarray:
        """Log density with respect to the value itself (not its logarithm)."""
        value = np.asarray(value, dtype=float)
        inside = (value >= self.low) & (value <= self.high)
        width = math.log(self.high) - math.log(self.low)
        with np.errstate(divide="ignore", invalid="ignore"):
            density = -np.log(np.where(inside, value, 1.0)) - math.log(width)
        return np.where(inside, density, -np.inf)

    def support(self) -> tuple[float, float]:
        return (self.low, self.high)


class NormalPrior(_PriorBase):
    """Gaussian density with mean ``mean`` and standard deviation ``std``."""

    kind: Literal["normal"] = "normal"
    mean: float
    std: float = Field(gt=0)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return rng.normal(self.mean, self.std, size)

    def log_prob(self, value: np.ndarray) -> np.ndarray:
        return np.asarray(stats.norm.logpdf(value, self.mean, self.std))

    def support(self) -> tuple[float, float]:
        return (-math.inf, math.inf)


class TruncatedNormalPrior(_PriorBase):
    """Gaussian density restricted to [low, high] and renormalised."""

    kind: Literal["truncated_normal"] = "truncated_normal"
    mean: float
    std: float = Field(gt=0)
    low: float
    high: float

    @model_validator(mode="after")
    def _check_bounds(self) -> TruncatedNormalPrior:
        if not self.low < self.high:
            raise ValueError(
                f"truncated_normal prior needs low < high, got low={self.low}, "
                f"high={self.high}: swap the bounds"
            )
        untruncated = stats.norm(self.mean, self.std)
        mass = untruncated.cdf(self.high) - untruncated.cdf(self.low)
        if mass < 1e-12:
            raise ValueError(
                f"truncated_normal prior has empty support: N({self.mean}, {self.std}) puts "
                f"{mass:.1e} of its mass in [{self.low}, {self.high}]; move the mean inside "
                "the bounds or widen std"
            )
        return self

    def _scipy(self):  # type: ignore[no-untyped-def]
        a = (self.low - self.mean) / self.std
        b = (self.high - self.mean) / self.std
        return stats.truncnorm(a, b, loc=self.mean, scale=self.std)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.asarray(self._scipy().rvs(size=size, random_state=rng), dtype=float)

    def log_prob(self, value: np.ndarray) -> np.ndarray:
        return np.asarray(self._scipy().logpdf(value))

    def support(self) -> tuple[float, float]:
        return (self.low, self.high)


class FixedPrior(_PriorBase):
    """A parameter held at one value: a delta prior, sampled as a constant column."""

    kind: Literal["fixed"] = "fixed"
    value: float

    @property
    def is_fixed(self) -> bool:
        return True

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.full(size, self.value, dtype=float)

    def log_prob(self, value: np.ndarray) -> np.ndarray:
        value = np.asarray(value, dtype=float)
        return np.where(value == self.value, 0.0, -np.inf)

    def support(self) -> tuple[float, float]:
        return (self.value, self.value)


Prior = Annotated[
    UniformPrior | LogUniformPrior | NormalPrior | TruncatedNormalPrior | FixedPrior,
    Field(discriminator="kind"),
]
