"""`torchrun --nproc_per_node N -m facemae_dist.reconstruct INPUT OUTPUT --model RUN [...]`."""

from facemae_dist.cli import run_entry
from facemae_dist.engine.reconstruct import main

if __name__ == "__main__":
    run_entry("reconstruct", main)
