"""`python -m eval.ruler` in a clone: runs focusft_jax.evaluation.ruler (installed: `focusft-ruler`)."""
import sys

from focusft_jax.evaluation.ruler import main

if __name__ == "__main__":
    sys.exit(main())
