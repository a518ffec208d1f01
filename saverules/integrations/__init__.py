"""The trainer integrations: Hugging Face ``Trainer`` and Lightning callbacks that read a saverules policy.

* :mod:`.transformers`: ``SaverulesCallback`` (imported as ``saverules.transformers``);
* :mod:`.lightning`: ``SaverulesCheckpoint`` (imported as ``saverules.lightning``);
* :mod:`.common`: the parts both share (policy, decider state, signals);
* :mod:`.manifest`: manifests of the trainers' own checkpoint directories.

Importing this package imports neither torch nor a trainer; each callback module imports its trainer.
"""
