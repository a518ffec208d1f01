"""The engine: save policies as data, compiled into decisions.  Pure Python: it imports no torch.

* :mod:`.rules`, :mod:`.quantities`, :mod:`.policy`: the policy's model (frozen, strict pydantic);
* :mod:`.loader`, :mod:`.locate`, :mod:`.errors`, :mod:`.limits`: TOML in, located diagnostics out;
* :mod:`.compile`, :mod:`.decider`, :mod:`.progress`: rules into runtime nodes, and the decision function;
* :mod:`.count`, :mod:`.simulate`, :mod:`.retention`, :mod:`.cost`: what a policy will do, before the run;
* :mod:`.tiers`: the two tiers of ``[durable]``: their decider, their simulation, and what the runtime
  keeps between them (the promotion queue, the protected set).
"""
