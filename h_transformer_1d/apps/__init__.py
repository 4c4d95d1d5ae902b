"""Applications built on the model: the `h-transformer-1d` command (train, evaluate, generate, bench, lra).

core/      what the applications share: configuration -> flags, checkpoints, runtime, training-loop pieces, logs
config.py  the byte-level language model's configuration, presets and model
data.py    its corpora and batches
train.py   its training loop, evaluation and sampling
bench.py   its training throughput
lra/       Long Range Arena tasks (ListOps): configuration, data, classifier, training loop
runs.py    `load`: the model of a run's checkpoint directory, whichever application wrote it
cli.py     the command line

Dependencies point one way: apps -> model -> attention. Nothing in the model imports from here.
"""
