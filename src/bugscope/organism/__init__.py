"""The planted format bug: a positive control whose location is known (research notes section 10)."""
