"""Does emulated 16-bit training compute what 16-bit tensors compute? VoxelMorph, on the CPU.

    .venv/bin/python benchmarks/learning_emulation.py [--shape 64 64] [--velocity 2.0] [--out FILE]

For bf16 and fp16, one training step of VxmPairwise (the paper's network: nb_features [16]*5, 5
integration steps, MSE + 0.01 * grad) on a synthetic 2-D pair, run twice from the same weights and
the same batch, all representable in the format:

- "16-bit tensors": the `bf16` / `fp16` arm, the network held and computed in torch's 16-bit dtype
  (on a CPU, the code path `native_formats: [bf16]` runs);
- "emulated": the `dynomp` arm fixed to the format under `execution: virtual`, float32 containers
  whose every operation `VirtualPrecision` rounds to the format.

The flow layer's weights are redrawn (the same in both, std from `--velocity`) so that the velocity
field spans a few voxels, as after training, rather than the 1e-5 voxels of a fresh network. The
table gives ||emulated - 16-bit|| / ||16-bit|| for each stage of the forward pass (forward hooks),
the three losses and the weights' gradients. Then torch's grid_sample on its own, with a smooth
displacement of a few voxels: its 16-bit CPU kernel against the same inputs sampled in float32 and
rounded once to the format (what CUDA's grid_sample computes: positions and weights in float,
`opmath_t`, for 16-bit tensors).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.nn import functional

from dynomp.learning.config import load_config
from dynomp.learning.train import build_run
from dynomp.precision.rounding import round_to

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import write_cohort

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# VxmPairwise's stages, in forward order: the U-Net's features, the velocity, its integral, the warp
STAGES = {"model": "U-Net output", "flow_layer": "velocity field",
          "velocity_field_integrator": "displacement (5 squarings)", "spatial_transformer": "warped image"}


def relative(reference: torch.Tensor, other: torch.Tensor) -> float:
    """||other - reference|| / ||reference|| in float64."""
    reference, other = reference.double(), other.double()
    return float((other - reference).norm() / reference.norm().clamp(min=1e-300))


def one_step(run, flow_weight: torch.Tensor, fmt: str, *, reference: bool = False) -> dict:
    """Forward (stage outputs kept), losses and gradients of step 0, with the flow layer's weights
    set to `flow_weight` rounded to the format (in the run's parameter dtype). `reference`: a
    float32 run given the format's weights and inputs (every weight and the batch rounded to it),
    which then computes unrounded."""
    model = run.model
    with torch.no_grad():
        if reference:
            for parameter in model.parameters():
                parameter.copy_(round_to(parameter, fmt))
        weight = model.flow_layer.conv0.weight
        weight.copy_(round_to(flow_weight, fmt).to(weight.dtype))
    outputs: dict[str, torch.Tensor] = {}
    hooks = [getattr(model, name).register_forward_hook(
        lambda module, inputs, output, name=name: outputs.__setitem__(name, output.detach().float().clone()))
        for name in STAGES]
    model.zero_grad(set_to_none=True)
    batch = run.task.batch(0)
    if reference:
        batch = tuple(round_to(tensor, fmt) for tensor in batch)
    with run.strategy.forward_context():
        losses = run.task.losses(model, batch, run.strategy)
    with run.strategy.backward_context():
        losses["total"].backward()
    for hook in hooks:
        hook.remove()
    gradient = torch.cat([p.grad.float().reshape(-1) for p in model.parameters() if p.grad is not None])
    return {"outputs": outputs, "losses": {key: float(value.detach()) for key, value in losses.items()},
            "gradient": gradient, "largest_velocity": float(outputs["flow_layer"].abs().max())}


def differences(a: dict, b: dict) -> dict[str, float]:
    """Relative differences of b from a, stage by stage, loss by loss, and of the gradients."""
    rows = {label: relative(a["outputs"][name], b["outputs"][name]) for name, label in STAGES.items()}
    for key in ("total", "image", "regularisation"):
        rows[f"loss: {key}"] = abs(b["losses"][key] - a["losses"][key]) / abs(a["losses"][key])
    rows["gradient of the weights"] = relative(a["gradient"], b["gradient"])
    return rows


def compare_step(fmt: str, data: Path, flow_weight: torch.Tensor) -> dict:
    """The three runs of one step with the format's weights and inputs (16-bit tensors, emulated,
    float32) and their relative differences."""
    native = build_run(load_config(arm=fmt, dim=2, steps=1, batch_size=2), data)
    emulated = build_run(load_config(arm="dynomp", dim=2, steps=1, batch_size=2, formats=(fmt,),
                                     initial_format=fmt, execution="virtual"), data)
    single = build_run(load_config(arm="fp32", dim=2, steps=1, batch_size=2), data)
    assert next(native.model.parameters()).dtype == DTYPES[fmt]
    assert next(emulated.model.parameters()).dtype == torch.float32
    a, b = one_step(native, flow_weight, fmt), one_step(emulated, flow_weight, fmt)
    c = one_step(single, flow_weight, fmt, reference=True)
    return {"emulated vs 16-bit": differences(a, b), "16-bit vs fp32": differences(c, a),
            "emulated vs fp32": differences(c, b), "largest_velocity": a["largest_velocity"],
            "losses": a["losses"]}


def compare_grid_sample(fmt: str, shape: tuple[int, int], displacement: float, seed: int) -> dict:
    """grid_sample of a smooth image at smoothly displaced points: the CPU's 16-bit kernel against
    float32 arithmetic on the same 16-bit inputs, rounded once."""
    generator = torch.Generator().manual_seed(seed)
    dtype = DTYPES[fmt]
    image = functional.avg_pool2d(torch.rand(1, 1, *shape, generator=generator) * 100, 5, 1, 2).to(dtype)
    coarse = torch.randn(1, 2, 4, 4, generator=generator) * displacement
    field = functional.interpolate(coarse, size=shape, mode="bicubic", align_corners=True)
    axes = [torch.linspace(-1, 1, n) for n in shape]
    identity = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1)[None]
    scale = torch.tensor([2.0 / (shape[1] - 1), 2.0 / (shape[0] - 1)])
    grid = (identity + field.permute(0, 2, 3, 1).flip(-1) * scale).to(dtype)
    sixteen = functional.grid_sample(image, grid, align_corners=True).float()
    single = round_to(functional.grid_sample(image.float(), grid.float(), align_corners=True), fmt)
    difference = (sixteen - single).abs()
    return {"relative": relative(single, sixteen), "largest": float(difference.max()),
            "differing": float((difference > 0).double().mean()), "mean_value": float(single.abs().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[64, 64], metavar=("H", "W"),
                        help="the 2-D grid (default 64 64)")
    parser.add_argument("--velocity", type=float, default=10.0,
                        help="scale of the redrawn flow-layer weights (default 10: a velocity of about 2 voxels)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = tuple(args.shape)
    results: dict = {"command": " ".join(sys.argv), "shape": list(shape), "steps": {}, "grid_sample": {}}
    with tempfile.TemporaryDirectory() as folder:
        data = write_cohort(Path(folder) / "cohort", (*shape, 3), count=4, seed=args.seed)
        probe = build_run(load_config(arm="fp32", dim=2, steps=1, batch_size=2), data)
        flow = probe.model.flow_layer.conv0.weight
        generator = torch.Generator().manual_seed(args.seed)
        flow_weight = torch.randn(flow.shape, generator=generator) * args.velocity / flow[0].numel() ** 0.5
        for fmt in DTYPES:
            results["steps"][fmt] = compare_step(fmt, data, flow_weight)
    for fmt in DTYPES:
        results["grid_sample"][fmt] = compare_grid_sample(fmt, shape, 3.0, args.seed)

    steps = results["steps"]
    pairs = ("emulated vs 16-bit", "16-bit vs fp32", "emulated vs fp32")
    print(f"One VoxelMorph step on {shape[0]} x {shape[1]}, largest velocity "
          f"{steps['bf16']['largest_velocity']:.2f} voxels; relative differences ||b - a|| / ||a|| of "
          "'b vs a' (fp32: a float32 run given the format's weights and inputs)\n")
    print("| | " + " | ".join(f"{fmt}: {pair}" for fmt in DTYPES for pair in pairs) + " |")
    print("|---|" + "---:|" * (len(DTYPES) * len(pairs)))
    for row in steps["bf16"][pairs[0]]:
        print(f"| {row} | " + " | ".join(f"{steps[fmt][pair][row]:.2e}" for fmt in DTYPES for pair in pairs) + " |")
    print("\ngrid_sample alone (smooth image of values 0-100, smooth displacement of a few voxels): "
          "16-bit CPU kernel against float32 arithmetic rounded once\n")
    print("| | bf16 | fp16 |\n|---|---:|---:|")
    samples = results["grid_sample"]
    for key, label, form in (("relative", "relative difference", "{:.2e}"),
                             ("largest", "largest difference", "{:.3g}"),
                             ("differing", "share of outputs that differ", "{:.2f}"),
                             ("mean_value", "mean output value", "{:.1f}")):
        print(f"| {label} | " + " | ".join(form.format(samples[fmt][key]) for fmt in DTYPES) + " |")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
