"""``python -m maas_jax``: the ``maas-jax`` command line."""

import sys

from maas_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
