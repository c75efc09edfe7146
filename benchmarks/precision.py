"""Benchmark of the precision core; prints a Markdown table of ratios for docs/benchmarks.md.

    .venv/bin/python benchmarks/precision.py [--size 10000000] [--repeats 15]

1. round_to on 10M float32 values against torch's own cast x.to(torch.bfloat16).float()
   (targets: <= 4x for nearest, <= 8x for stochastic), and pychop's Chop against round_to fp16
   when pychop is installed (`.venv/bin/pip install pychop`; it is not a dependency).
2. VirtualPrecision("bf16") on the forward and backward pass of a small 3D conv net against plain
   fp32 (target: <= 3x).
Each ratio pairs the two timings run alternately, `repeats` times after two warm-ups, in one
process, and divides their medians (so that other load on the machine hits both sides alike).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from dynomp.precision import VirtualPrecision, round_to


def paired_medians(
    baseline: Callable[[], object], candidate: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median wall times of two functions run alternately (so load on the machine hits both)."""
    for _ in range(2):
        baseline()
        candidate()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for function, store in ((baseline, times[0]), (candidate, times[1])):
            start = time.perf_counter()
            function()
            store.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def small_conv_net() -> torch.nn.Module:
    """Three 3D convolutions with ReLU: the shape of a registration network's encoder."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(2, 16, 3, padding=1),
        torch.nn.LeakyReLU(0.2),
        torch.nn.Conv3d(16, 16, 3, padding=1, stride=2),
        torch.nn.LeakyReLU(0.2),
        torch.nn.Conv3d(16, 3, 3, padding=1),
    )


def main() -> None:
    """Run both benchmarks and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.size)
    generator = torch.Generator().manual_seed(0)
    rows = []

    def cast_function() -> torch.Tensor:
        return x.to(torch.bfloat16).float()

    casts = []
    for label, function, target in [
        ("round_to(x, 'bf16')", lambda: round_to(x, "bf16"), "<= 4x"),
        ("round_to(x, 'bf16', 'stochastic')",
         lambda: round_to(x, "bf16", "stochastic", generator=generator), "<= 8x"),
        ("round_to(x, 'fp16')", lambda: round_to(x, "fp16"), ""),
        ("round_to(x, 'fp8-e4m3')", lambda: round_to(x, "fp8-e4m3"), ""),
    ]:
        cast, seconds = paired_medians(cast_function, function, args.repeats)
        casts.append(cast)
        rows.append((label, seconds, seconds / cast, target))
    cast = statistics.median(casts)
    rows.insert(0, ("torch cast x.to(bfloat16).float()", cast, 1.0, "baseline"))
    try:
        from pychop import Chop
    except ImportError:
        rows.append(("pychop Chop(5, 10) (fp16)", float("nan"), float("nan"), "not installed"))
    else:
        chop = Chop(exp_bits=5, sig_bits=10, rmode=1)
        ours, seconds = paired_medians(
            lambda: round_to(x, "fp16"), lambda: chop(x), max(3, args.repeats // 3)
        )
        wrong = chop(torch.tensor([65520.0, 65536.0, 1e5])).tolist()
        rows.append(
            ("pychop Chop(5, 10) (fp16), vs round_to fp16 = 1", seconds, seconds / ours,
             f"65520, 65536, 1e5 -> {wrong} (should be inf)")
        )

    net = small_conv_net()
    volume = torch.randn(2, 2, 48, 48, 48)

    def forward_backward() -> None:
        net.zero_grad(set_to_none=True)
        net(volume).square().mean().backward()

    def emulated() -> None:
        with VirtualPrecision("bf16"):
            forward_backward()

    plain, virtual = paired_medians(forward_backward, emulated, args.repeats)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size:,} values\n")
    print("| operation | median seconds | ratio to baseline | target |")
    print("|---|---|---|---|")
    for label, seconds, ratio, target in rows:
        print(f"| {label} | {seconds:.4f} | {ratio:.2f}x | {target} |")
    print(f"| 3D conv net fwd+bwd, fp32 (2x2x48^3) | {plain:.4f} | 1.00x | |")
    print(f"| same under VirtualPrecision('bf16') | {virtual:.4f} | {virtual / plain:.2f}x | <= 3x |")


if __name__ == "__main__":
    main()
