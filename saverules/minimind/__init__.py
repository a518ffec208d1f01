"""A minimind-style reference model, data and training loop for saverules.

Submodules (import them directly; this package imports nothing heavy):

* :mod:`saverules.minimind.model` -- ``ModelConfig``, ``PRESETS``, ``config_for``, ``MiniMindLM``.
* :mod:`saverules.minimind.data` -- ``ByteTokenizer``, ``load_tokenizer``, ``PretrainDataset``,
  ``default_corpus``, ``default_dataset``, ``write_jsonl``, ``ResumableSampler``, ``resume_point``.

These need torch (``pip install saverules[torch]``); the saverules engine does not.
"""
