"""The `bitnet-jax` command line: `main(argv)` (in `app`), also run by `python -m bitnet_jax.cli`."""

from bitnet_jax.cli.app import main

__all__ = ["main"]
