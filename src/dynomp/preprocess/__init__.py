"""Preprocessing: brain extraction of whole-head T1-weighted images."""

from dynomp.preprocess.brain_extraction import (
    METHODS,
    BrainExtraction,
    derivative_paths,
    extract_brain,
    extract_brain_dataset,
    extract_brain_file,
    surface_to_mask,
)

__all__ = [
    "METHODS",
    "BrainExtraction",
    "derivative_paths",
    "extract_brain",
    "extract_brain_dataset",
    "extract_brain_file",
    "surface_to_mask",
]
