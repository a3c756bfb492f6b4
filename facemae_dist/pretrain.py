"""`torchrun --nproc_per_node N -m facemae_dist.pretrain --config CONFIG [key=value ...]`."""

from facemae_dist.cli import run_entry
from facemae_dist.engine.pretrain import main

if __name__ == "__main__":
    run_entry("pretrain", main)
