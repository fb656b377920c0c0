"""Causal edits beyond head patching: SAE features ablated, clamped and steered against random controls,
and the critical features each even-head set turns on."""
