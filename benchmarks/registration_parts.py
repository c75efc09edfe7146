"""Where an engine iteration's time goes, per format: the parts of a full-resolution iteration.

    .venv/bin/python benchmarks/registration_parts.py [--shape 65 77 63] [--repeats 7] [--threads 2]

Times each part the engine repeats at every iteration of the benchmark pair's finest level
(65 x 77 x 63 voxels) in float64 and float32, on smooth random volumes and fields, and prints a
Markdown table with fp32 / fp64 per part:

- MI value and gradient at 25 % of the voxels (rigid and affine): compiled (`parzen`) and as
  torch operations (what CUDA and the emulated formats run);
- a rigid or affine evaluation at those voxels (sample at C p, MI, dMI/dC): the fused C kernel
  (`parzen.LinearInformation`), and the C sampler, compiled MI and autograd it replaced;
- one image warped at x + u(x), value and gradient (SyN's evaluate warps two): the compiled
  displaced sampler, the sampler at coordinates built as identity + u, and the displaced sampler's
  numba fallback (what runs where there is no C compiler);
- a field composed with an update (SyN's step composes two), with the C sampler and with numba's;
- SyN's evaluation (both warps, CC's value and gradients, back to both fields): the compiled calls
  made in turn, and the same kernels through autograd;
- SyN's whole step of both fields (each smoothed, its largest norm taken, composed): the fused C
  passes (`update_norm`, `compose_scaled`) and the torch operations they replaced;
- a whole SyN iteration (evaluation and step) by the general compiled calls, and by the prepared
  iteration that SyN's coarse levels run (`registration.symmetric_iteration`: the same calls with
  their arguments and intermediates prepared once; below 2^17 voxels, so at the coarse shapes);
- local CC (radius 4), value and both gradients: the fused C passes, the torch operations with the
  C filter's box sums, and the torch operations with BLAS matrix products (the fallback);
- Gaussian smoothing of a 3-component field (sigma 3 voxels: SyN's update), C filter and BLAS;
- the precision controller's observation of SyN's state (two fields and their gradients), with
  the C statistics pass and with the numba one;
- one whole rigid iteration at the coarsest level (evaluate, step, the controller's observation),
  with the compiled call (`linear_parameters`) and with the torch operations and autograd that
  CUDA and the emulated formats run;
- the sampler's parts again with the sampler built with -DSAMPLER_SINGLE_LOADS ("corners loaded
  one by one"), where float32 otherwise loads a cell's two x-neighbours as one 8-byte value: the
  gathers this saves are float32's whole gain in those rows.

Each round times every part in both formats in turn (mean of `--inner` calls after a warm-up
call), and the table reports the median over `--repeats` rounds, so that drift in the machine's
speed hits both formats alike.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dynomp import native
from dynomp.heap import reused_heap
from dynomp.precision import estimator
from dynomp.precision.controller import PrecisionController
from dynomp.registration import interpolation, metrics, pipeline, pyramid
from dynomp.registration.config import paper_config
from dynomp.registration.interpolation import load_kernels
from dynomp.registration.metrics import (
    build_loss,
    joint_histogram,
    local_cross_correlation,
    mutual_information,
    mutual_information_of_histogram,
    parzen_taps,
)
from dynomp.registration.parzen import LinearInformation
from dynomp.registration.pipeline import SymmetricProblem
from dynomp.registration.precision import PrecisionSetting
from dynomp.registration.pyramid import build_level, smooth
from dynomp.registration.transforms import compose, identity_coordinates, sample, warp


def set_aside(load: Callable[[], dict], module: object, attribute: str,
              function: Callable[[], object]) -> Callable[[], None]:
    """`function` run with the table of C kernels that `load` fills (`module.attribute`) emptied,
    so that the fallback runs, and the table restored after."""
    def run() -> None:
        kept = load()
        setattr(module, attribute, {})
        try:
            function()
        finally:
            setattr(module, attribute, kept)
    return run


def numba_sampler(function: Callable[[], object]) -> Callable[[], None]:
    """`function` with the sampler's C kernels set aside: the numba fallback runs."""
    return set_aside(interpolation.native_kernels, interpolation, "_native_kernels", function)


@functools.cache
def single_load_kernels() -> dict:
    """The sampler's C kernels built with -DSAMPLER_SINGLE_LOADS (a cell's corners loaded one by one,
    not float32's x-neighbours as one 8-byte load), in a temporary folder; empty without a compiler."""
    compiler = native.compiler()
    if compiler is None or not interpolation.native_kernels():
        return {}
    folder = Path(tempfile.mkdtemp(prefix="dynomp-single-loads-"))
    kept = os.environ.get("CC")
    os.environ["CC"] = f"{kept or compiler} -DSAMPLER_SINGLE_LOADS"
    try:
        path = native.build("registration/sampler", folder=folder)
    finally:
        if kept is None:
            del os.environ["CC"]
        else:
            os.environ["CC"] = kept
    return interpolation.kernel_table(ctypes.CDLL(str(path)))


def single_loads(function: Callable[[], object]) -> Callable[[], None]:
    """`function` with the sampler's kernels built to load a cell's corners one by one."""
    def run() -> None:
        kept = interpolation.native_kernels()
        interpolation._native_kernels = single_load_kernels() or kept
        try:
            function()
        finally:
            interpolation._native_kernels = kept
    return run


def matrix_filters(function: Callable[[], object]) -> Callable[[], None]:
    """`function` with the C separable filter set aside: the BLAS matrix products run."""
    return set_aside(pyramid.filter_kernels, pyramid, "_filter_kernels", function)


def axis_filters(function: Callable[[], object]) -> Callable[[], None]:
    """`function` with the one-call volume filter set aside: the C filter runs one call per axis."""
    def load() -> dict:
        pyramid.filter_kernels()
        return pyramid._volume_filter_kernels
    return set_aside(load, pyramid, "_volume_filter_kernels", function)


def torch_correlation(function: Callable[[], object]) -> Callable[[], None]:
    """`function` with local CC's fused C passes set aside: its torch operations run (C box sums)."""
    return set_aside(metrics.correlation_kernels, metrics, "_correlation_kernels", function)


def numba_statistics(function: Callable[[], object]) -> Callable[[], None]:
    """`function` with the controller's C statistics set aside: the numba kernel runs."""
    return set_aside(estimator.native_statistics, estimator, "_native_statistics", function)


def parts(shape: tuple[int, int, int], dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """The timed parts, each a no-argument callable, on data in `dtype`."""
    generator = torch.Generator().manual_seed(0)

    def smooth_random(*leading: int, sigma: float, scale: float = 1.0) -> torch.Tensor:
        noise = torch.randn(*leading, *shape, dtype=torch.float64, generator=generator) * scale
        return smooth(noise, sigma, dimensions=3).to(dtype)

    fixed = smooth_random(sigma=1.0) + 1.0
    moving = smooth_random(sigma=1.0) + 1.0
    field = smooth_random(3, sigma=3.0, scale=20.0)
    update = smooth_random(3, sigma=3.0, scale=5.0)
    identity = identity_coordinates(shape, dtype=dtype)
    samples = torch.arange(0, fixed.numel(), 4)
    fixed_samples, moving_samples = fixed.reshape(-1)[samples], moving.reshape(-1)[samples]
    fixed_range = (float(fixed.min()), float(fixed.max()))
    moving_range = (float(moving.min()), float(moving.max()))

    def mi_compiled() -> None:
        values = moving_samples.clone().requires_grad_(True)
        torch.autograd.grad(mutual_information(fixed_samples, values, bins=32, fixed_range=fixed_range,
                                               moving_range=moving_range), values)

    def mi_torch() -> None:
        values = moving_samples.clone().requires_grad_(True)
        joint = joint_histogram(parzen_taps(fixed_samples, low=fixed_range[0], high=fixed_range[1], bins=32),
                                parzen_taps(values, low=moving_range[0], high=moving_range[1], bins=32), bins=32)
        torch.autograd.grad(mutual_information_of_histogram(joint), values)

    # a rigid or affine level's evaluation: the moving image sampled at C p, MI and dMI/dC
    combined = torch.tensor([[1.02, 0.03, -0.01, 0.8], [-0.02, 0.98, 0.02, -0.5], [0.01, -0.03, 1.01, 0.3]],
                            dtype=dtype)
    points = identity.reshape(3, -1)[:, samples]
    fused = LinearInformation(moving=moving, points=points, fixed=fixed_samples, bins=32, padding=2,
                              fixed_range=fixed_range, moving_range=moving_range)

    def linear_fused() -> None:
        fused.value_and_gradient(combined.numpy())

    single = {}

    def build_single() -> None:  # the kernel is looked up when the object is built
        single["fused"] = LinearInformation(moving=moving, points=points, fixed=fixed_samples, bins=32,
                                            padding=2, fixed_range=fixed_range, moving_range=moving_range)

    single_loads(build_single)()

    def linear_fused_single() -> None:
        single["fused"].value_and_gradient(combined.numpy())

    def linear_torch() -> None:
        matrix = combined.clone().requires_grad_(True)
        values = sample(moving, matrix[:, :3] @ points + matrix[:, 3:])
        torch.autograd.grad(mutual_information(fixed_samples, values, bins=32, fixed_range=fixed_range,
                                               moving_range=moving_range), matrix)

    def warp_displaced() -> None:
        displacement = field.clone().requires_grad_(True)
        torch.autograd.grad(warp(moving, displacement).sum(), displacement)

    def warp_coordinates() -> None:
        displacement = field.clone().requires_grad_(True)
        torch.autograd.grad(sample(moving, identity + displacement).sum(), displacement)

    def cc() -> None:
        a, b = fixed.clone().requires_grad_(True), moving.clone().requires_grad_(True)
        torch.autograd.grad(local_cross_correlation(a, b, radius=4), [a, b])

    # SyN's step of both fields (smooth, largest norm, compose): fused, and as torch operations
    syn = next(stage for stage in paper_config().stages if stage.name == "syn")
    setting = PrecisionSetting("fp64" if dtype == torch.float64 else "fp32", device="cpu",
                               config=paper_config().precision)
    problem = SymmetricProblem(fixed=fixed, moving=moving, fixed_field=field, moving_field=-field,
                               loss=build_loss("cc", fixed=fixed, moving=moving, radius=4), stage=syn,
                               setting=setting)
    step_gradients = [update, -update]

    class Uncompiled:
        """The same loss without its compiled value-and-gradients path: autograd runs."""

        def __init__(self, loss: Callable[..., torch.Tensor]) -> None:
            self.loss = loss

        def __call__(self, *images: torch.Tensor) -> torch.Tensor:
            return self.loss(*images)

    through_autograd = SymmetricProblem(fixed=fixed, moving=moving, fixed_field=field, moving_field=-field,
                                        loss=Uncompiled(problem.loss), stage=syn, setting=setting)
    # SyN's coarse levels run a prepared iteration (registration.symmetric_iteration); the rows above
    # it time the general compiled calls at every shape, and the two whole-iteration rows compare them
    prepared = SymmetricProblem(fixed=fixed, moving=moving, fixed_field=field, moving_field=-field,
                                loss=problem.loss, stage=syn, setting=setting)
    problem.prepared = None

    def syn_iteration(level: SymmetricProblem) -> Callable[[], None]:
        def run() -> None:
            level.fixed_field, level.moving_field = field, -field
            _, gradients = level.evaluate()
            level.step(gradients)
        return run

    def syn_step() -> None:
        problem.fixed_field, problem.moving_field = field, -field
        problem.step(step_gradients)

    def unfused(function: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            kept = pipeline.update_kernels
            pipeline.update_kernels = lambda *fields: False
            try:
                function()
            finally:
                pipeline.update_kernels = kept
        return run

    # one whole rigid iteration at the coarsest level (shrink 8: 126 MI samples on the benchmark pair's
    # grid), as optimize_level runs it: evaluate, step, observe
    affine = torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0], dtype=torch.float64))
    coarse = pipeline._Images(fixed=build_level(fixed.double(), affine, shrink_factor=8, sigma=3.0),
                              moving=build_level(moving.double(), affine, shrink_factor=8, sigma=3.0))
    rigid = next(stage for stage in paper_config().stages if stage.name == "rigid")
    rigid_setting = PrecisionSetting("fp64" if dtype == torch.float64 else "fp32", device="cpu",
                                     config=paper_config().precision)
    rigid_setting.start_level()
    center = torch.tensor([float(n - 1) * 1.5 for n in shape], dtype=torch.float64)
    rigid_problem = pipeline.LinearProblem(
        kind="rigid", images=coarse, parameters=torch.tensor([0.02, -0.01, 0.03, 1.0, -2.0, 0.5], dtype=torch.float64),
        center=center, loss=build_loss("mi", fixed=coarse.fixed.data, moving=coarse.moving.data, bins=32,
                                       sampling_fraction=rigid.sampling_fraction, seed=0),
        learning_rate=rigid.learning_rate, setting=rigid_setting, relaxation=rigid.relaxation,
    )
    start = rigid_problem.parameters.clone()

    def rigid_iteration() -> None:
        rigid_problem.parameters = start
        _, gradients = rigid_problem.evaluate()
        rigid_problem.step(gradients)
        rigid_setting.observe(rigid_problem.state(), gradients)

    def torch_rigid_iteration() -> None:
        kept, rigid_problem.information = rigid_problem.information, None
        try:
            rigid_iteration()
        finally:
            rigid_problem.information = kept

    controller = PrecisionController(["fp32", "fp64"], 5, "native", initial_format="fp64")
    state, gradients = [field, field * 0.5], [update, update * 0.5]
    controller.observe(state, gradients)

    return {
        "MI value + gradient, compiled (78,829 samples)": mi_compiled,
        "MI value + gradient, torch operations": mi_torch,
        "linear map: sample + MI + dMI/dC, fused C kernel": linear_fused,
        "linear map: sample + MI + dMI/dC, sampler + compiled MI + autograd": linear_torch,
        "warp value + gradient, displaced sampler": warp_displaced,
        "warp value + gradient, sampler at identity + u": warp_coordinates,
        "warp value + gradient, displaced sampler, numba fallback": numba_sampler(warp_displaced),
        "warp value + gradient, displaced sampler, corners loaded one by one": single_loads(warp_displaced),
        "compose a field with an update": lambda: compose(field, update),
        "compose a field with an update, corners loaded one by one": single_loads(lambda: compose(field, update)),
        "compose a field with an update, numba fallback": numba_sampler(lambda: compose(field, update)),
        "local CC r=4, value + both gradients": cc,
        "local CC r=4, value + both gradients, box sums axis by axis": axis_filters(cc),
        "local CC r=4, value + both gradients, torch pointwise operations": torch_correlation(cc),
        "local CC r=4, value + both gradients, torch operations and BLAS box sums": torch_correlation(matrix_filters(cc)),
        "SyN evaluation (both warps, CC, gradients to both fields), compiled calls": problem.evaluate,
        "SyN evaluation, through autograd": through_autograd.evaluate,
        "SyN evaluation, compiled calls, corners loaded one by one": single_loads(problem.evaluate),
        "SyN evaluation, compiled calls, box sums axis by axis": axis_filters(problem.evaluate),
        "SyN iteration (evaluate, step of both fields), general compiled calls": syn_iteration(problem),
        "SyN iteration, prepared arguments (under 2^17 voxels; the general calls from there up)":
            syn_iteration(prepared),
        "SyN step of both fields (smooth, norm, compose), fused": syn_step,
        "SyN step of both fields, fused, corners loaded one by one": single_loads(syn_step),
        "SyN step of both fields, torch operations for norm and compose": unfused(syn_step),
        "SyN step of both fields, fused, smoothing axis by axis": axis_filters(syn_step),
        "smooth a 3-component field, sigma 3": lambda: smooth(update, 3.0, dimensions=3),
        "smooth a 3-component field, sigma 3, axis by axis": axis_filters(lambda: smooth(update, 3.0, dimensions=3)),
        "smooth a 3-component field, sigma 3, BLAS": matrix_filters(lambda: smooth(update, 3.0, dimensions=3)),
        "controller observe (2 fields + 2 gradients)": lambda: controller.observe(state, gradients),
        "controller observe, numba statistics": numba_statistics(lambda: controller.observe(state, gradients)),
        "linear map: sample + MI + dMI/dC, fused, corners loaded one by one": linear_fused_single,
        "rigid iteration at the coarsest level (evaluate, step, observe), compiled": rigid_iteration,
        "rigid iteration at the coarsest level, torch operations and autograd": torch_rigid_iteration,
    }


def seconds(function: Callable[[], object], inner: int) -> float:
    function()
    started = time.perf_counter()
    for _ in range(inner):
        function()
    return (time.perf_counter() - started) / inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[65, 77, 63])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.repeats < 1 or args.inner < 1:
        parser.error("--repeats and --inner: must be at least 1")
    torch.set_num_threads(args.threads)
    load_kernels()
    shape = tuple(args.shape)
    dtypes = {"fp64": torch.float64, "fp32": torch.float32}
    work = {name: parts(shape, dtype) for name, dtype in dtypes.items()}
    timings: dict[tuple[str, str], list[float]] = {}
    # freed pages kept for reuse, as register_pair keeps them
    with reused_heap():
        for _ in range(args.repeats):
            for part in work["fp64"]:
                for name in dtypes:
                    timings.setdefault((part, name), []).append(seconds(work[name][part], args.inner))
    print(f"shape {shape}, {args.threads} threads, median of {args.repeats} rounds x {args.inner} calls, "
          "freed pages kept (dynomp.heap.reused_heap)\n")
    print("| part | fp64 ms | fp32 ms | fp32 / fp64 |")
    print("|---|---:|---:|---:|")
    for part in work["fp64"]:
        fp64 = 1e3 * statistics.median(timings[(part, "fp64")])
        fp32 = 1e3 * statistics.median(timings[(part, "fp32")])
        print(f"| {part} | {fp64:.2f} | {fp32:.2f} | {fp32 / fp64:.2f} |")


if __name__ == "__main__":
    main()
