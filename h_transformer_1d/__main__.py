"""`python -m h_transformer_1d ...` is the `h-transformer-1d` command."""

from .apps.cli import main

raise SystemExit(main())
