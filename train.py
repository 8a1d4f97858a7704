"""Fine-tune with FocuSFT from a clone: `python train.py --config configs/tiny.yaml ...`.

The trainer is focusft_jax/train.py (installed, the same `main` is the
`focusft-train` command); this script only runs it, so that a clone works
without installing anything. `python train.py --help` lists the options.
"""
from __future__ import annotations

import sys

from focusft_jax.train import main, train

__all__ = ["main", "train"]  # `import train; train.train(cfg)` as before the move

if __name__ == "__main__":
    sys.exit(main())
