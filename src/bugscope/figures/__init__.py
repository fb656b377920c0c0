"""Figures drawn from the results tables (never from an engine): the shared style, and one module per
subject."""
