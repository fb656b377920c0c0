"""Activation patching of attention heads: head sets, prompt pairs and positions, the patching engine,
the study's experiments, their summaries with intervals over number pairs, and the original study's own
procedure with its decomposition."""
