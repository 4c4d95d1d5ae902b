"""Applications built on the model: the `h-transformer-1d` command (train, evaluate, generate, bench).

Dependencies point one way: apps -> model -> attention. Nothing in the model imports from here.
"""
