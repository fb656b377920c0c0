"""SAEs: SAE-Lens's directory of pretrained releases, SAEs on disk, activations streamed from the cache,
training, sparse encoding and reconstruction quality."""
