"""Training steps of the ratio estimator with swyft's channelled layers against the einsum form.

The heads are swyft ``MarginalClassifier`` networks made of ``LinearWithChannel``
layers. :class:`alpnre.nre.EinsumLinearWithChannel` computes the same layer as one
matrix product per channel. This benchmark times full training steps (forward of joint
and marginal pairs, loss, backward, AdamW step) of the same network, from the same
weights and on the same minibatch, with both layer forms. swyft's form is the
reference; the ratio is einsum samples/s over swyft samples/s. It also prints the
largest difference of the log-ratios of both forms (evaluation mode, dropout off).

    python benchmarks/bench_channel_layers.py                 # both networks below
    python benchmarks/bench_channel_layers.py --threads 1 --markdown

Networks: ``default`` is the default ``TrainingConfig``; ``wide`` is the fixed-field
network of docs/validation.md (embedding width 512, 64 features, heads of width 128,
``theta_frequencies`` 6). Synthetic minibatches: a training step costs the same
whatever the counts and parameters.
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import statistics
import time
from datetime import datetime

import torch
from alpnre.config import load_config
from alpnre.nre import (
    EinsumLinearWithChannel,
    EstimatorSpec,
    RatioEstimator,
    TrainingConfig,
    default_heads,
    nre_loss,
    parameter_axes,
)
from swyft.networks.channelized import LinearWithChannel

log = logging.getLogger("bench_channel_layers")

CONFIG = "ngc1275_cta_north_50h"
NETWORKS = {
    "default": TrainingConfig(),
    "wide": TrainingConfig(
        embedding_width=512, n_features=64, head_width=128, theta_frequencies=6, bnre_lambda=0.0
    ),
}


def build_model(training: TrainingConfig) -> RatioEstimator:
    """Build the standard estimator of the default config with ``training``'s network."""
    config = load_config(CONFIG)
    names, one_dim, two_dim = default_heads(config)
    spec = EstimatorSpec(
        n_bins=config.observation.n_energy_bins,
        axes=parameter_axes(config, names),
        one_dim=one_dim,
        two_dim=two_dim,
        training=training,
    )
    torch.manual_seed(0)
    return RatioEstimator(spec)


def with_layer_class(model: RatioEstimator, layer_class: type) -> RatioEstimator:
    """Return a copy of ``model`` whose channelled layers are of ``layer_class``."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, LinearWithChannel):
            module.__class__ = layer_class
    return copied


def steps_per_second(
    model: RatioEstimator, x: torch.Tensor, theta: torch.Tensor, bnre_lambda: float, steps: int
) -> float:
    """Time ``steps`` training steps after one warm-up step; return steps per second."""
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        nre_loss(model, x, theta, bnre_lambda).backward()
        optimiser.step()
    return steps / (time.perf_counter() - start)


def measure(name: str, args: argparse.Namespace) -> dict[str, float]:
    training = NETWORKS[name].model_copy(update={"batch_size": args.batch_size})
    model = build_model(training)
    generator = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.full((args.batch_size, model.spec.n_bins), 20.0), generator=generator)
    theta = torch.rand((args.batch_size, len(model.spec.axes)), generator=generator) * 2 - 1

    einsum_model = with_layer_class(model, EinsumLinearWithChannel)
    swyft_model = with_layer_class(model, LinearWithChannel)
    einsum_model.eval()
    swyft_model.eval()
    with torch.no_grad():
        fast, slow = einsum_model(x, theta), swyft_model(x, theta)
        difference = max(float((fast[key] - slow[key]).abs().max()) for key in fast)

    rates: dict[str, list[float]] = {"einsum": [], "swyft": []}
    for repeat in range(args.repeats):
        # Alternate the two forms so that load from other processes falls on both.
        for form, layer_class in (
            ("einsum", EinsumLinearWithChannel),
            ("swyft", LinearWithChannel),
        ):
            fresh = with_layer_class(model, layer_class)
            steps = args.steps if form == "einsum" else max(2, args.steps // 10)
            rate = steps_per_second(fresh, x, theta, training.bnre_lambda, steps)
            rates[form].append(rate * args.batch_size)
            log.info("%s, repeat %d, %s: %.0f samples/s", name, repeat, form, rates[form][-1])
    einsum_rate = statistics.median(rates["einsum"])
    swyft_rate = statistics.median(rates["swyft"])
    return {
        "einsum": einsum_rate,
        "swyft": swyft_rate,
        "ratio": einsum_rate / swyft_rate,
        "max_difference": difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40, help="timed einsum steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {name: measure(name, args) for name in args.networks}
    header = (
        f"{datetime.now():%Y-%m-%d %H:%M}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"batch {args.batch_size}, medians of {args.repeats} repeats"
    )
    if args.markdown:
        print(header + "\n")
        print(
            "| network | swyft layers, samples/s | einsum layers, samples/s "
            "| ratio | max abs Δ log-ratio |"
        )
        print("|---|---:|---:|---:|---:|")
        for name, row in results.items():
            print(
                f"| {name} | {row['swyft']:.0f} | {row['einsum']:.0f} | {row['ratio']:.1f} "
                f"| {row['max_difference']:.1e} |"
            )
    else:
        print(header)
        for name, row in results.items():
            print(
                f"{name}: swyft {row['swyft']:.0f} samples/s, einsum {row['einsum']:.0f} "
                f"samples/s, ratio {row['ratio']:.1f}, "
                f"max |Δ log-ratio| {row['max_difference']:.1e}"
            )


if __name__ == "__main__":
    main()
