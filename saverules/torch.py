"""The checkpoint store under its first import path: ``from saverules.torch import Checkpointer``.

The store lives in the package :mod:`saverules.store`; this module re-exports
its public names so that code written against ``saverules.torch`` keeps
working.  Like the store, importing it imports torch.
"""
from __future__ import annotations

from .store import *  # noqa: F401,F403
from .store import __all__  # noqa: F401
