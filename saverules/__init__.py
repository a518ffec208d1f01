"""saverules: declarative, checked checkpoint-save policies for training loops.

    policy = saverules.load("rules/default.toml")
    decide = policy.compile(total_steps=10_000)
    for step in range(1, 10_001):
        ...train...
        if decide(saverules.Progress(step, total_steps=10_000)):
            ...save...

The core is pure Python and imports no torch; the checkpoint store lives in
:mod:`saverules.store` (also importable as :mod:`saverules.torch`).
"""
from .engine.decider import Decider
from .engine.errors import Diagnostic, PolicyError
from .engine.loader import load, loads
from .engine.policy import Policy
from .engine.progress import Checkpoint, Decision, Progress
from .engine.simulate import Simulation

__version__ = "0.3.0"

__all__ = [
    "Checkpoint", "Decider", "Decision", "Diagnostic", "Policy", "PolicyError", "Progress", "Simulation",
    "load", "loads", "__version__",
]
