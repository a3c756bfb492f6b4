#!/usr/bin/env python
"""A stage on Slurm (or locally) through submitit; the same as `facemae submit` (run with --help)."""

import sys

from facemae_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))
