"""``from saverules.transformers import ...``: the transformers integration, which lives in :mod:`saverules.integrations.transformers`."""
from __future__ import annotations

from .integrations.transformers import *  # noqa: F401,F403
from .integrations.transformers import __all__  # noqa: F401
