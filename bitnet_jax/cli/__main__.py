import sys

from bitnet_jax.cli.app import main

sys.exit(main())
