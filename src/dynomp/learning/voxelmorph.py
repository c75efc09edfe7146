"""The registration task: VoxelMorph's VxmPairwise trained with neurite's losses on seeded pairs.

Loss = image term (MSE, or -NCC) between the warped moving and the fixed image + lambda * the L2
spatial gradient of the predicted velocity field (VoxelMorph regularises the field before
integration). Both are reduced in float32 whatever the arm computes in.
"""

from __future__ import annotations

from pathlib import Path

import neurite as ne
import torch
import voxelmorph as vxm

from dynomp.learning.config import TrainingConfig
from dynomp.learning.data import PairSampler, load_subjects, pad_to_multiple, split_subjects
from dynomp.learning.strategies import Strategy
from dynomp.precision.dispatch import widened_call


class RegistrationTask:
    """Builds VxmPairwise, draws training pairs and computes the three losses of a step."""

    def __init__(self, config: TrainingConfig, data: str | Path) -> None:
        self.config = config
        subjects = load_subjects(
            data, dim=config.dim, layout=config.layout, slice_index=config.slice_index
        )
        # neurite's BasicUNet halves the grid once per entry of nb_features
        subjects = pad_to_multiple(subjects, 2 ** len(config.nb_features))
        self.train_subjects, self.held_out_subjects = split_subjects(
            subjects, held_out_fraction=config.held_out_fraction, seed=config.seed
        )
        self.sampler = PairSampler(
            self.train_subjects, batch_size=config.batch_size, seed=config.seed
        )
        if config.image_loss == "mse":
            self.image_loss = ne.nn.modules.MSE()
        else:
            ncc = ne.nn.modules.NCC(window_size=config.ncc_window)
            self.image_loss = lambda warped, fixed: -ncc(warped, fixed).mean()
        self.regulariser = ne.nn.modules.SpatialGradient(penalty="l2")

    def build_model(self) -> torch.nn.Module:
        """A VxmPairwise with the configured features and integration steps."""
        return vxm.nn.models.VxmPairwise(
            ndim=self.config.dim,
            source_channels=1,
            target_channels=1,
            nb_features=list(self.config.nb_features),
            integration_steps=self.config.integration_steps,
            device=self.config.device,
        )

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """Adam at the configured learning rate (1e-4 in the paper)."""
        return torch.optim.Adam(model.parameters(), lr=self.config.learning_rate)

    def output_layer(self, model: torch.nn.Module) -> torch.nn.Module:
        """The layer whose output dtype shows what the network computed in."""
        return model.flow_layer

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (moving, fixed) batch of `step`, float32 on the CPU."""
        moving, fixed = self.sampler.batch(step)
        return torch.from_numpy(moving), torch.from_numpy(fixed)

    def losses(
        self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], strategy: Strategy
    ) -> dict[str, torch.Tensor]:
        """Total, image and regularisation losses of one batch (float32 scalars)."""
        moving, fixed = (strategy.cast_input(tensor) for tensor in batch)
        velocity, warped = model(
            moving, fixed, return_warped_source=True, return_field_type="velocity"
        )
        return self.reduce(warped, fixed, velocity)

    def reduce(self, warped: torch.Tensor, fixed: torch.Tensor, velocity: torch.Tensor) -> dict[str, torch.Tensor]:
        """The three losses of a step's outputs, in float32 forward and backward whatever their
        format: natively 16-bit outputs are widened (their gradients rounded back once), and under
        an emulated format, whose float32 tensors `.float()` would not convert, the reduction runs
        unrounded too rather than rounded op by op."""

        def reduced(warped: torch.Tensor, fixed: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
            image = self.image_loss(warped, fixed)
            regularisation = self.regulariser(velocity)
            return torch.stack([image + self.config.regularisation_weight * regularisation, image, regularisation])

        total, image, regularisation = widened_call(reduced, warped, fixed, velocity).unbind(0)
        return {"total": total, "image": image, "regularisation": regularisation}
