"""Long Range Arena tasks (Tay et al., 2021) on the package's encoder: `h-transformer-1d lra ...`.

listops.py  the ListOps data: generator, evaluator, TSV files, tokens
model.py    SequenceClassifier: a non-causal HTransformer1D body with a pooling head
train.py    the recipe: configuration, training loop, evaluation, checkpoints
cli.py      the `lra` command line
"""
