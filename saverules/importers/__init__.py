"""Importers: a trainer's own save settings turned into a saverules policy.

Each module reads one trainer's settings as data (JSON, an opcode-level pickle
reader, :mod:`ast`, TOML; nothing is evaluated or imported), maps them to a
:class:`~saverules.importers.draft.Draft` and keeps a small documented model of
the trainer's own schedule, so ``python -m saverules.convert`` can show both
side by side.  Settings a policy cannot express raise
:class:`~saverules.importers.draft.Refused`, naming them.
"""
