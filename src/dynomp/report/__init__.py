"""Tidy tables, statistics and figures of a study's results."""
