"""The evaluation tools' entry points in a clone: `python -m eval.babilong`,
`python -m eval.ruler`, `python -m eval.generate`.

The code lives in focusft_jax.evaluation (installed, the same `main`s are the
commands focusft-babilong, focusft-ruler, focusft-generate). `eval` is too
generic a name to install as a top-level package, so this folder is not
installed and holds nothing but these entry points.
"""
