"""Feature analyses on the encoded SAE features: values per prompt, the overlap between formats and its
same-format chance levels, discriminative and named features, the direct attribution of attention heads
to features, and the offline feature pages (workflow/rules/features.smk). `stages` holds the drivers
the workflow scripts call."""
