"""Neural ratio estimation of the ALP parameters with swyft ratio estimators.

A classifier d(x, θ) is trained to tell jointly drawn pairs (x, θ) ~ p(x, θ) from
marginal pairs (x, θ') ~ p(x) p(θ); its logit converges to the log likelihood-to-evidence
ratio log r(x|θ) = log p(x|θ) - log p(x) = log p(θ|x) - log p(θ) (Hermans et al. 2020,
ICML, "Likelihood-free MCMC with Amortized Approximate Ratio Estimators"). The loss is
the binary cross-entropy of both kinds of pairs, optionally with the balancing penalty
of BNRE (Delaunoy et al. 2022, NeurIPS, "Towards Reliable Simulation-Based Inference
with Balanced Neural Ratio Estimation"),

.. math::
    \\lambda \\left(\\mathbb{E}_{p(x,θ)}[σ(d)] + \\mathbb{E}_{p(x)p(θ)}[σ(d)] - 1\\right)^2,

which pushes the estimator towards conservative posteriors when simulations are few.

Network: log1p(counts), standardised with the training set's mean and standard
deviation (stored in the state dict), then an MLP embedding, then log-ratio heads built
on swyft's channelled ``MarginalClassifier``: one per listed parameter and one for the
2-dim (log10 m, log10 g) marginal. The heads see the parameters either as they are or,
with ``theta_frequencies`` > 0, with sine/cosine features added (:class:`ThetaEncoding`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from alpnre.config import AnalysisConfig

with warnings.catch_warnings():
    # swyft 0.4.5 imports pytorch-lightning 1.9, whose lightning_fabric warns that
    # pkg_resources is deprecated on every import; nothing here uses it.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    import swyft
    from swyft.networks.channelized import LinearWithChannel
from alpnre.priors import LogUniformPrior

__all__ = [
    "EinsumLinearWithChannel",
    "EstimatorSpec",
    "ParameterAxis",
    "RatioEstimator",
    "ThetaEncoding",
    "TrainingConfig",
    "nre_loss",
    "parameter_axes",
    "use_einsum_channel_layers",
]

log = logging.getLogger(__name__)


class TrainingConfig(BaseModel):
    """Hyperparameters of one training."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(1e-3, gt=0, le=1.0)
    batch_size: int = Field(256, ge=8, le=65536)
    shuffle_buffer: int = Field(16384, ge=64)
    max_epochs: int = Field(50, ge=1, le=10_000)
    patience: int = Field(5, ge=1, description="epochs without validation improvement")
    embedding_width: int = Field(256, ge=8, le=4096)
    n_features: int = Field(32, ge=2, le=1024)
    head_width: int = Field(64, ge=8, le=4096)
    head_blocks: int = Field(2, ge=1, le=16)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    bnre_lambda: float = Field(
        10.0,
        ge=0.0,
        description="BNRE balancing penalty; 0 gives plain NRE. The default trades some "
        "learning speed for conservative posteriors: on 3000 spectra of a 40-bin config, "
        "lambda = 100 still sat at chance level (loss 2.70) after 10 epochs, lambda = 10 "
        "reached 2.14 after 15 and lambda = 0 reached 1.93",
    )
    marginal_pairs: int = Field(
        1,
        ge=1,
        le=64,
        description="marginal pairs per joint pair: each x is paired with the θ of the next "
        "marginal_pairs rows of its minibatch. More pairs show the classifier more θ near "
        "the true one for each x, at the price of more head evaluations. The loss keeps its "
        "minimum at log r",
    )
    validation_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    poisson_redraw: bool = Field(True, description="redraw counts from npred every epoch")
    drop_nonfinite: bool = False
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes")
    weight_decay: float = Field(0.0, ge=0.0)
    lr_decay_factor: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="learning rate multiplier applied after lr_decay_patience epochs without "
        "a lower validation loss; 1 keeps the learning rate constant",
    )
    lr_decay_patience: int = Field(
        2, ge=1, description="epochs without a lower validation loss before a decay"
    )
    theta_frequencies: int = Field(
        0,
        ge=0,
        le=12,
        description="sine/cosine frequencies per standardised parameter fed to the heads "
        "besides the parameter itself (frequencies pi * 2^k, k < theta_frequencies); 0 feeds "
        "the parameters alone. An MLP on raw parameters learns sharp ratio peaks slowly",
    )
    nuisance_marginals: list[str] = Field(
        default_factory=list,
        description="nuisance parameters that get their own 1-dim estimator, e.g. b0_microgauss",
    )

    @model_validator(mode="after")
    def _check_marginal_pairs(self) -> TrainingConfig:
        if self.marginal_pairs >= self.batch_size:
            raise ValueError(
                f"marginal_pairs={self.marginal_pairs} must be below batch_size="
                f"{self.batch_size}: a roll by batch_size pairs each x with its own θ"
            )
        return self


class ParameterAxis(BaseModel):
    """How one simulator parameter enters the network.

    ``log10`` parameters (log-uniform priors) are used as log10 of the value. The
    network input is ``(u - center) / scale``, where u is the (log) value.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    log10: bool
    low: float
    high: float
    center: float
    scale: float

    @property
    def label(self) -> str:
        return f"log10({self.name})" if self.log10 else self.name

    def to_axis(self, values: np.ndarray) -> np.ndarray:
        """Map physical values to the axis variable u (log10 or linear)."""
        values = np.asarray(values, dtype=float)
        if self.log10:
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.log10(values)
        return values

    def from_axis(self, u: np.ndarray) -> np.ndarray:
        u = np.asarray(u, dtype=float)
        return 10.0**u if self.log10 else u

    def standardise(self, u: np.ndarray) -> np.ndarray:
        return (np.asarray(u) - self.center) / self.scale


def parameter_axes(config: AnalysisConfig, names: Sequence[str]) -> list[ParameterAxis]:
    """Build the network axes of ``names`` from the config's priors.

    Bounded priors are mapped to [-1, 1]; normal priors to zero mean and unit width.
    """
    axes = []
    for name in names:
        prior = config.prior(name)
        if prior.is_fixed:
            raise ValueError(f"{name} is fixed in the config and cannot be inferred")
        log10 = isinstance(prior, LogUniformPrior)
        low, high = prior.support()
        if log10:
            low, high = math.log10(low), math.log10(high)
        if math.isfinite(low) and math.isfinite(high):
            center, scale = 0.5 * (low + high), 0.5 * (high - low)
        else:
            center, scale = float(prior.mean), float(prior.std)
            low, high = center - 5 * scale, center + 5 * scale
        axes.append(
            ParameterAxis(name=name, log10=log10, low=low, high=high, center=center, scale=scale)
        )
    return axes


class EstimatorSpec(BaseModel):
    """Everything needed to rebuild a trained estimator besides its weights."""

    model_config = ConfigDict(extra="forbid")

    n_bins: int
    axes: list[ParameterAxis]
    one_dim: list[str]
    two_dim: list[tuple[str, str]]
    training: TrainingConfig

    @property
    def parameter_names(self) -> list[str]:
        return [axis.name for axis in self.axes]

    def axis(self, name: str) -> ParameterAxis:
        for axis in self.axes:
            if axis.name == name:
                return axis
        raise KeyError(f"parameter {name!r} has no estimator axis; known: {self.parameter_names}")

    def transform_theta(self, theta: np.ndarray) -> np.ndarray:
        """Map raw θ of shape (N, n_params) to standardised network inputs."""
        columns = [axis.standardise(axis.to_axis(theta[:, i])) for i, axis in enumerate(self.axes)]
        return np.stack(columns, axis=1).astype(np.float32)


class SpectrumEmbedding(nn.Module):
    """log1p(counts) → standardised → MLP features; (B, n_bins) → (B, n_features)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_bins: int, width: int, n_features: int, dropout: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_bins))
        self.register_buffer("std", torch.ones(n_bins))
        self.net = nn.Sequential(
            nn.Linear(n_bins, width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, n_features),
        )

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        z = (torch.log1p(counts) - self.mean) / self.std
        return self.net(z)


class ThetaEncoding(nn.Module):
    """Map each standardised parameter u to [u, sin(π 2^k u), cos(π 2^k u)], k < K.

    An MLP fed with raw parameters is biased towards functions that vary slowly in
    them (the spectral bias of Rahaman et al. 2019, ICML), so the narrow posterior
    islands of strong ALP signals take many epochs to resolve. Sines and cosines up
    to frequency π 2^(K-1) let the first layer represent structure as fine as
    2^(1-K) of the standardised range [-1, 1] (Tancik et al. 2020, NeurIPS). K = 0
    is the identity.
    """

    frequencies: torch.Tensor

    def __init__(self, n_frequencies: int) -> None:
        super().__init__()
        self.n_frequencies = n_frequencies
        # Not persistent: the frequencies follow from the spec, and state dicts of
        # estimators without an encoding keep their keys.
        frequencies = math.pi * 2.0 ** torch.arange(n_frequencies, dtype=torch.float32)
        self.register_buffer("frequencies", frequencies, persistent=False)

    def output_size(self, n_inputs: int) -> int:
        return n_inputs * (1 + 2 * self.n_frequencies)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        """(..., P) → (..., P (1 + 2K))."""
        if self.n_frequencies == 0:
            return blocks
        phases = (blocks.unsqueeze(-1) * self.frequencies).flatten(-2)
        return torch.cat([blocks, torch.sin(phases), torch.cos(phases)], dim=-1)


class EinsumLinearWithChannel(LinearWithChannel):
    """swyft's ``LinearWithChannel`` computed as one matrix product per channel.

    swyft evaluates ``matmul(weights, x[..., None])``: the (channels, out, in) weights
    are broadcast to every row of the batch and multiplied as B x C matrix-vector
    products, in the forward and again in the backward pass. On a 2-core CPU that made
    training steps 10 (default network) to 24 (wide fixed-field network) times slower
    than this einsum, see ``benchmarks/bench_channel_layers.py``. The layer keeps its
    parameters and state-dict keys and gives the same values to float32 rounding.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...ci,coi->...co", x, self.weights) + self.bias


def use_einsum_channel_layers(model: nn.Module) -> nn.Module:
    """Switch every swyft ``LinearWithChannel`` in ``model`` to :class:`EinsumLinearWithChannel`.

    The layers keep their parameters (only their class changes), so no random numbers
    are drawn and the initial weights of a seeded training stay what they were.
    """
    for module in model.modules():
        if type(module) is LinearWithChannel:
            module.__class__ = EinsumLinearWithChannel
    return model


class ChannelRatioHead(nn.Module):
    """Log-ratio heads for several marginals of ``block_size`` parameters each.

    Built on swyft's channelled ``MarginalClassifier``: one residual network per
    marginal, all evaluated in one batched pass. ``forward(features, theta_blocks)``
    takes features (B, n_features) and parameters (B, n_marginals * block_size),
    marginal k in columns k * block_size ... (k + 1) * block_size - 1, and returns
    log-ratios (B, n_marginals).
    """

    def __init__(
        self,
        n_features: int,
        n_marginals: int,
        block_size: int,
        hidden_features: int,
        num_blocks: int,
        dropout: float,
        theta_frequencies: int = 0,
    ) -> None:
        super().__init__()
        self.n_marginals = n_marginals
        self.block_size = block_size
        self.encoding = ThetaEncoding(theta_frequencies)
        self.classifier = swyft.networks.MarginalClassifier(
            n_marginals,
            n_features + self.encoding.output_size(block_size),
            hidden_features=hidden_features,
            num_blocks=num_blocks,
            dropout_probability=dropout,
            use_batch_norm=False,
        )

    def encode(self, blocks: torch.Tensor) -> torch.Tensor:
        """Parameter blocks (B, n_marginals, block_size) → the classifier's inputs."""
        return self.encoding(blocks)

    def forward(self, features: torch.Tensor, theta_blocks: torch.Tensor) -> torch.Tensor:
        blocks = theta_blocks.reshape(len(theta_blocks), self.n_marginals, self.block_size)
        return self.classifier(features, self.encode(blocks))


class PairRatioHead(ChannelRatioHead):
    """2-dim log-ratio heads: pair k in columns 2k and 2k + 1 of ``theta_blocks``."""

    def __init__(
        self,
        n_features: int,
        n_pairs: int,
        hidden_features: int,
        num_blocks: int,
        dropout: float,
        theta_frequencies: int = 0,
    ) -> None:
        super().__init__(
            n_features, n_pairs, 2, hidden_features, num_blocks, dropout, theta_frequencies
        )

    @property
    def n_pairs(self) -> int:
        return self.n_marginals


class RatioEstimator(nn.Module):
    """Embedding plus swyft 1-dim and 2-dim log-ratio heads.

    ``forward(x, theta)`` takes counts x of shape (B, n_bins) and standardised θ of
    shape (B, n_params) and returns a dict: ``"1d"`` of shape (B, n_1d) and ``"2d"`` of
    shape (B, n_2d) log-ratios.
    """

    def __init__(self, spec: EstimatorSpec) -> None:
        super().__init__()
        self.spec = spec
        names = spec.parameter_names
        self.index_1d = [names.index(name) for name in spec.one_dim]
        self.pairs_2d = [(names.index(a), names.index(b)) for a, b in spec.two_dim]
        training = spec.training
        self.embedding = SpectrumEmbedding(
            spec.n_bins, training.embedding_width, training.n_features, training.dropout
        )
        # Batch normalisation is switched off in both heads: its batch statistics
        # differ between joint and marginal pairs and between training and evaluation,
        # which made the validation loss rise while the training loss fell.
        self.head_1d: nn.Module
        if training.theta_frequencies == 0:
            # Kept for estimators saved before the encoding existed: same state-dict keys.
            self.head_1d = swyft.LogRatioEstimator_1dim(
                num_features=training.n_features,
                num_params=len(self.index_1d),
                varnames=list(spec.one_dim),
                hidden_features=training.head_width,
                num_blocks=training.head_blocks,
                dropout=training.dropout,
                use_batch_norm=False,
                ptrans_online_z_score=False,
            )
        else:
            self.head_1d = ChannelRatioHead(
                n_features=training.n_features,
                n_marginals=len(self.index_1d),
                block_size=1,
                hidden_features=training.head_width,
                num_blocks=training.head_blocks,
                dropout=training.dropout,
                theta_frequencies=training.theta_frequencies,
            )
        self.head_2d = (
            PairRatioHead(
                n_features=training.n_features,
                n_pairs=len(self.pairs_2d),
                hidden_features=training.head_width,
                num_blocks=training.head_blocks,
                dropout=training.dropout,
                theta_frequencies=training.theta_frequencies,
            )
            if self.pairs_2d
            else None
        )
        use_einsum_channel_layers(self)

    def set_normalisation(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Store the per-bin mean and standard deviation of log1p(counts)."""
        self.embedding.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        # A floor on the width keeps bins that were (almost) always empty in the
        # normalisation sample from amplifying a rare count into a huge input.
        self.embedding.std.copy_(torch.as_tensor(np.maximum(std, 0.05), dtype=torch.float32))

    def log_ratios(self, features: torch.Tensor, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Log-ratios for precomputed features (B, n_features) and θ (B, n_params)."""
        one_dim = self.head_1d(features, theta[:, self.index_1d])
        # swyft's head returns LogRatioSamples, ChannelRatioHead a tensor.
        out = {"1d": getattr(one_dim, "logratios", one_dim)}
        if self.head_2d is not None:
            columns = [theta[:, [a, b]] for a, b in self.pairs_2d]
            out["2d"] = self.head_2d(features, torch.cat(columns, dim=1))
        return out

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.log_ratios(self.embedding(x), theta)


def nre_loss(
    model: RatioEstimator,
    x: torch.Tensor,
    theta: torch.Tensor,
    bnre_lambda: float,
    marginal_pairs: int = 1,
) -> torch.Tensor:
    """Binary cross-entropy of joint against marginal pairs, plus the BNRE penalty.

    Marginal pairs pair each x with the θ of the next ``marginal_pairs`` rows (rolls by
    1 ... marginal_pairs within the minibatch), so rows must be shuffled. Each of those
    pairs is a draw from p(x) p(θ), and the marginal term averages over them, so the
    minimiser of the loss is the log-ratio for any ``marginal_pairs``. The loss is
    summed over all heads.
    """
    n = len(x)
    if not 1 <= marginal_pairs < n:
        raise ValueError(
            f"invalid marginal_pairs={marginal_pairs} for a minibatch of {n} rows: use "
            "1 <= marginal_pairs < batch_size, because a roll by the minibatch size pairs "
            "each x with its own θ"
        )
    features = model.embedding(x)
    rolled = [torch.roll(theta, shifts=shift, dims=0) for shift in range(1, marginal_pairs + 1)]
    # One pass over joint and marginal pairs together.
    both = model.log_ratios(
        torch.cat([features] * (marginal_pairs + 1)), torch.cat([theta, *rolled])
    )
    joint = {key: value[:n] for key, value in both.items()}
    marginal = {key: value[n:] for key, value in both.items()}
    bce = nn.functional.binary_cross_entropy_with_logits
    total = x.new_zeros(())
    for key, logits_joint in joint.items():
        logits_marginal = marginal[key]
        total = total + bce(logits_joint, torch.ones_like(logits_joint), reduction="mean")
        total = total + bce(logits_marginal, torch.zeros_like(logits_marginal), reduction="mean")
        if bnre_lambda > 0:
            balance = (
                torch.sigmoid(logits_joint).mean(dim=0)
                + torch.sigmoid(logits_marginal).mean(dim=0)
                - 1.0
            )
            total = total + bnre_lambda * (balance**2).sum()
    return total


def default_heads(
    config: AnalysisConfig, nuisance_marginals: Sequence[str] = ()
) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Return (parameter names, 1-dim heads, 2-dim heads) of the standard estimator."""
    free = set(config.free_parameter_names)
    unknown = [name for name in nuisance_marginals if name not in free]
    if unknown:
        raise ValueError(
            f"nuisance marginals {unknown} are not free parameters of config {config.name!r}; "
            f"free parameters: {sorted(free)}"
        )
    one_dim = ["m_neV", "g_per_gev", *nuisance_marginals]
    return one_dim, one_dim, [("m_neV", "g_per_gev")]


def resolve_device(device: str) -> torch.device:
    """Turn ``auto|cpu|cuda`` into a torch device, rejecting cuda without a GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' requested but torch finds no CUDA device: use 'auto' or 'cpu'"
        )
    return torch.device(device)


def spec_to_json(spec: EstimatorSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")
