"""The small parts that build the published architectures at tiny or real size with random weights: a base model's
shared pieces, tokenizers derived from the published vocabularies, the reward models' builders (which read the
reward models' own definitions in ``precise_lightning.rewards``). The policies and ``tiny`` build on it; it
imports neither."""
