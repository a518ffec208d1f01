"""Resume: put a decoded checkpoint back into the caller's state and the decider."""
from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from .errors import CheckpointError, log, warn
from .manifest import CheckpointInfo
from .state import Payload, has_state_dict


def restore(info: CheckpointInfo, payload: Payload, state: MutableMapping[str, Any], decider: Any,
            policy_digest: str) -> float:
    """Restore ``payload`` into ``state`` and ``decider``; the training clock to continue from."""
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
    try:
        decider.load_state_dict(payload.decider)
    except Exception as exc:
        warn(
            f"saverules: the decider state in {info.path} does not fit this policy ({exc}); "
            "the decider starts fresh from the saved step"
        )
        decider.note_save(info.step, info.time)
    if info.policy_digest is not None and info.policy_digest != policy_digest:
        log.info("checkpoint %s was written under a different policy (digest %s)", info.path,
                 info.policy_digest[:12])
    clock = payload.clock if payload.clock is not None else info.time
    log.info("resumed from checkpoint %s (step %d)", info.path, info.step)
    return float(clock) if clock is not None else 0.0
