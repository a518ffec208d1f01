"""Resume: put a decoded checkpoint back into the caller's state and the decider.

:func:`restore_decider` is the one way a decider continues from a saved
state, for the Checkpointer (both formats), the trainer callbacks and the
synced DDP decider.  It imports no torch, so the callbacks use it too.
"""
from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, log, warn

if TYPE_CHECKING:
    from .manifest import CheckpointInfo
    from .state import Payload


def restore_decider(decider: Any, saved: Any, step: int, time: float | None, where: str) -> None:
    """Continue ``decider`` from ``saved`` (a ``state_dict()``) of the save at ``step``.

    Rules are matched by what they are: under a changed policy the rules both
    policies hold keep their state and the others start fresh from ``step``;
    one warning names which.  A state that is missing or does not load at all
    starts every rule fresh from ``step``, as if it had just saved, with a
    warning that says why.

    The tiers may differ too (see :class:`saverules.engine.tiers.TieredDecider`):
    a two-tier state into a two-tier decider continues each tier; a one-tier
    state into a decider of a policy that gained ``[durable]`` continues the
    local tier and starts the durable tier's rules fresh from ``step``; a
    two-tier state into a one-tier decider continues the local tier and drops
    the durable tier's state.  The warning says which.
    """
    problem = None
    if not isinstance(saved, Mapping):
        problem = "holds no decider state (written without saverules?)"
    else:
        try:
            resumed = decider.load_state_dict(dict(saved))
        except (ValueError, KeyError, TypeError) as exc:
            problem = f"holds a decider state that does not load ({exc})"
        else:
            message = resumed.message(where, step) if resumed is not None else None
            if message is not None:
                warn(message)
            return
    warn(f"saverules: {where} (step {step}) {problem}; every rule starts fresh from step {step}")
    fresh = decider.fresh_state(step, time)
    decider.load_state_dict(fresh)


def restore(info: CheckpointInfo, payload: Payload, state: MutableMapping[str, Any], decider: Any,
            policy_digest: str) -> float:  # noqa: ARG001 - the saved state names its own policy
    """Restore ``payload`` into ``state`` and ``decider``; the training clock to continue from."""
    from .state import has_state_dict

    objects, values = payload.objects, payload.values
    for name, sd in objects.items():
        target = state.get(name)
        if target is None or not has_state_dict(target):
            warn(
                f"saverules: checkpoint {info.path} holds the state of {name!r} but the state passed to "
                "load_latest has no such object; it was not restored"
            )
            continue
        try:
            target.load_state_dict(sd)
        except Exception as exc:
            raise CheckpointError(f"saverules: restoring {name!r} from {info.path} failed: {exc}") from exc
    for name in state:
        if name not in objects and name not in values:
            warn(f"saverules: checkpoint {info.path} has no entry {name!r}; it was left as it is")
    for name, value in values.items():
        if name in state and has_state_dict(state[name]):
            warn(
                f"saverules: checkpoint {info.path} holds a plain value for {name!r} but the state has an "
                "object with load_state_dict there; it was not restored"
            )
            continue
        state[name] = value
    saved = payload.decider
    if isinstance(saved, dict) and saved.get("policy") is None and info.policy_digest is not None:
        saved = {**saved, "policy": info.policy_digest}  # a state written before it named its policy
    restore_decider(decider, saved, info.step if info.step is not None else 0, info.time, f"checkpoint {info.path}")
    clock = payload.clock if payload.clock is not None else info.time
    log.info("resumed from checkpoint %s (step %d)", info.path, info.step)
    return float(clock) if clock is not None else 0.0
