"""``from saverules.lightning import ...``: the lightning integration, which lives in :mod:`saverules.integrations.lightning`."""
from __future__ import annotations

from .integrations.lightning import *  # noqa: F401,F403
from .integrations.lightning import __all__  # noqa: F401
