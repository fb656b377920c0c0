"""The study's data: the prompt table (number pairs, formats, aligned positions), the SAE training corpus,
and the unpatched model's baseline answers."""
