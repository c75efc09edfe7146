"""dynomp: dynamic mixed precision for medical image registration."""

__version__ = "0.1.0"
