"""`torchrun --nproc_per_node N -m facemae_dist.train --config CONFIG [key=value ...]`."""

from facemae_dist.cli import run_entry
from facemae_dist.engine.recognize import main

if __name__ == "__main__":
    run_entry("train", main)
