"""`python -m eval.babilong` in a clone: runs focusft_jax.evaluation.babilong (installed: `focusft-babilong`)."""
import sys

from focusft_jax.evaluation.babilong import main

if __name__ == "__main__":
    sys.exit(main())
