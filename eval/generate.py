"""`python -m eval.generate` in a clone: runs focusft_jax.evaluation.generate (installed: `focusft-generate`)."""
import sys

from focusft_jax.evaluation.generate import main

if __name__ == "__main__":
    sys.exit(main())
