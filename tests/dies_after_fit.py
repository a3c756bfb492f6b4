"""`python -m facemae_dist.train` whose rank 1 dies right after training (before the final
verification and export): what a rank lost to the OOM killer or a bad node looks like to the others.
Started by tests/test_recognize_dist.py under torchrun."""

import os

import facemae_dist.engine.recognize as recognize
from facemae_dist.cli import run_entry

_fit = recognize.fit


def _fit_then_die(*args, **kwargs):
    state = _fit(*args, **kwargs)
    if os.environ.get("RANK") == "1":
        os._exit(9)
    return state


recognize.fit = _fit_then_die
run_entry("train", recognize.main)
