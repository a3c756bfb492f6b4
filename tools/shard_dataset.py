#!/usr/bin/env python
"""Faces → WebDataset shards; the same as `facemae shard` (run with --help for the options)."""

import sys

from facemae_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["shard", *sys.argv[1:]]))
