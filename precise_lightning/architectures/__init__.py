"""The published architectures and the small parts that build them at tiny or real size with random weights: each
model's published ``config.json`` values (``published/``), tokenizers derived from the published vocabularies, the
reward models' builders. The lowest layer of the package: it imports nothing of it."""
