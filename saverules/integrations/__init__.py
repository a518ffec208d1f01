"""The trainer integrations: Hugging Face ``Trainer`` and Lightning callbacks that read a saverules policy.

* :mod:`.transformers`: ``SaverulesCallback`` (imported as ``saverules.transformers``);
* :mod:`.lightning`: ``SaverulesCheckpoint`` (imported as ``saverules.lightning``);
* :mod:`.common`: the parts both share (options, clock, signals, the save timer, the decider's resume);
  the policy, the decider and its restore are the store's own;
* :mod:`.manifest`: manifests of the trainers' own checkpoint directories.

Importing this package imports neither torch nor a trainer; each callback module imports its trainer.
"""
