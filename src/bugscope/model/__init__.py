"""The model layer: loading a checkpoint, where each hook site lives, forward passes, activation caching,
generation and splicing. The only package that imports transformers internals, registers a hook or runs
the model; everything above it calls these functions."""
