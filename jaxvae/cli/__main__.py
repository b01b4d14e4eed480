"""`python -m jaxvae.cli`: the `jaxvae` command."""

import sys

from jaxvae.cli.app import main

sys.exit(main())
