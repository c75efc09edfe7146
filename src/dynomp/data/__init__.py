"""Data: validated NIfTI I/O, BIDS, the embedded cohort, DataLad and TemplateFlow."""
