"""ced-train: consistent ensemble distillation of small, fast audio taggers.

Importing the package is light (no Lightning, no Hydra): `data_prep` and the CLIs import pieces of it.
"""

__version__ = "0.1.0"
