"""The application core: what the language model (apps/) and the LRA tasks (apps/lra/) share.

config.py      configuration dataclasses: fields with their flag, help and checks; TOML, validation, resume rules
checkpoint.py  a run's saves: each complete or absent (a directory renamed into place), checked on load
files.py       exclusive, durable writes and bounded reads of regular files only
runtime.py     device, precision and process group of this process
training.py    optimizer, schedules, stopping on a non-finite loss, saving and restoring training state
metrics.py     metrics.csv (and TensorBoard when installed)
plots.py       curves.png
cli.py         the flags every tool shares, and starting or resuming a run from them

An application describes itself with an `App` (its name, configuration class and model builder) and keeps
only its own data, model and training loop.
"""
