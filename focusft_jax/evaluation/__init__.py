"""The evaluation and inference tools: BABILong (`babilong`), RULER (`ruler`)
and plain generation (`generate`), with what they share (the other modules).

Installed, they are the commands `focusft-babilong`, `focusft-ruler` and
`focusft-generate`; in a clone, also `python -m eval.babilong` etc. (eval/
holds only those entry points). The benchmark definitions they read ship
with the package, in benchmarks/.
"""
