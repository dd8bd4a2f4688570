"""The filter → correlate → compress paradigm as small pure tensor functions (no model knowledge).

- `attention`: head-averaged attention probabilities and key metrics the stages read.
- `filter`: redundancy / importance scores and the selection of sources S and targets T.
- `correlate`: correlation matrices and the choice of targets J_i with their weights α.
- `compress`: merges that fold S into T (or into new tokens), and gathers of the kept tokens.

See docs/paradigm.md for every function, its shapes and which method uses it.
"""
from ficoco.paradigm import attention, compress, correlate, filter

__all__ = ["attention", "filter", "correlate", "compress"]
