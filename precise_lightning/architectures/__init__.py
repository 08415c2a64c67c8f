"""The small parts that build the published architectures at tiny or real size with random weights: a base model's
shared pieces, tokenizers derived from the published vocabularies, the reward models' builders. The lowest layer
of the package: it imports nothing of it."""
