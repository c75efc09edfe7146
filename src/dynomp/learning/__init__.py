"""Learning arms: VoxelMorph and a small CNN under fixed, automatic and dynamic precision."""

from dynomp.learning.config import TrainingConfig, load_config
from dynomp.learning.strategies import STRATEGIES, make_strategy

__all__ = ["STRATEGIES", "TrainingConfig", "load_config", "make_strategy"]
