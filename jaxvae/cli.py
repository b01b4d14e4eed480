"""Command line: `jaxvae train|score|evaluate|demo|bench` (thin: parse, call the library, print)."""

import sys


def main(argv=None) -> int:
    print("jaxvae: the command line is not yet implemented", file=sys.stderr)
    return 0
