"""Long Range Arena tasks (Tay et al., 2021) on the package's encoder: `h-transformer-1d lra ...`.

listops.py  the ListOps data: generator, evaluator, TSV files, tokens
model.py    SequenceClassifier: a non-causal HTransformer1D body with a pooling head
config.py   the recipe's configuration (ListOpsConfig) and the classifier it builds
data.py     the data as tensors: splits, batches bucketed by length, operand shuffling
train.py    the training loop, evaluation
cli.py      the `lra` command line

Configuration flags, checkpoints, optimizer, runtime and logs come from the application core (../core/).
"""
