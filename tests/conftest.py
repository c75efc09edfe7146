"""Fixtures shared across test folders."""

from tests.slurm import local_slurm  # noqa: F401  (the session fixture of the Slurm tests)
