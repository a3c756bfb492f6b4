"""`python -m facemae_dist.audit RELEASED ORIGINAL [ORIGINAL ...] --model M [--out report.json]`."""

from facemae_dist.cli import run_entry
from facemae_dist.eval.privacy import main

if __name__ == "__main__":
    run_entry("audit", main)
