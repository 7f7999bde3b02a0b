"""The bottom layer: what every other layer needs and nothing model-source specific.

errors (one-line user errors), selection (which modules a technique touches),
hardware (CPU features, the environment record), memory (freeing and measuring it),
arch (what kind of model), adapter (the architecture adapter: blocks, projections,
feeding norms, head and embeddings per family), attention (the implementation
used for training), data (text corpora and their splits), progress (bars on stderr),
registry (techniques by name, and the context each receives), recipe (steps as data),
losses (distillation terms) and training (the one training loop).
Nothing here imports from another slimkit layer.
"""
