"""The reference loop's report at the end of a run: what each tier holds, why, and what no checkpoint holds.

:func:`print_summary` lists the local store (each checkpoint, the rules that
saved it and the retention rules that keep it; what retention removed, from
the store's removal log; the trained steps no checkpoint holds) and
:func:`print_durable_summary` the durable tier (its checkpoints, and whether
the final step reached it).  ``say`` prints a line.
"""
from __future__ import annotations


def print_durable_summary(say, policy, durable, trained, not_durable) -> None:
    """What reached the durable tier: its checkpoints, why each is kept, and whether the final step is there."""
    from saverules.engine.tiers import durable_policy
    from saverules.torch import retention_view

    if not_durable is not None:  # the tier may be unreachable: listing it would only retry; the error says why
        say(f"the final step {trained} did NOT reach the durable tier {durable.url}")
        return
    try:
        good = [e for e in durable.list() if e.ok and e.step is not None]
    except Exception as exc:  # the tier is unreachable now: say so, the exit status says the rest
        say(f"the durable tier {durable.url} cannot be listed now ({type(exc).__name__}: {exc})")
        return
    tier_policy = durable_policy(policy)
    why = tier_policy.explain_retention(retention_view(good)) if good and tier_policy is not None else [()] * len(good)
    say(f"checkpoints in the durable tier {durable.url} ({len(good)}):")
    for e, kept_by in zip(good, why):
        reasons = list(e.reasons)  # the local tier's rules, then "durable" and the durable tier's
        cut = reasons.index("durable") if "durable" in reasons else len(reasons)
        for_durable = ", ".join(reasons[cut + 1:]) or "-"
        say(f"  {e.name}  step {e.step}  saved for: {for_durable} (local: {', '.join(reasons[:cut]) or '-'})"
            f"  kept by: {', '.join(kept_by) or '-'}")
    if any(e.step == trained for e in good):
        say(f"the final step {trained} reached the durable tier")
    else:
        say(f"the newest durable step is {max((e.step for e in good), default=0)}; the last trained step {trained} "
            "is not in the durable tier (no durable rule chose it)")


def print_summary(say, policy, ckpt_dir, listing, saves, start_step, trained, total_steps, stop_signal,
                  earlier=(), began: float | None = None) -> None:
    """Where the checkpoints are, which were kept and why, and which trained steps no checkpoint holds.

    The checkpoints that retention removed since ``began`` (a wall-clock time:
    this run's start) are read from the store's removal log, the record that
    ``saverules.ls`` lists too; those among ``earlier`` (the steps that earlier
    runs left in the store when this run resumed) are named as such.
    """
    from saverules.store.removed import read

    if stop_signal:
        say(f"stopped by {stop_signal} after step {trained} of {total_steps}")
    say(f"trained steps {start_step + 1}-{trained} in this run; saved "
        + (", ".join(str(s) for s, _ in saves) if saves else "nothing"))
    good = [e for e in listing if e.ok and e.step is not None]
    if good:
        from saverules.torch import retention_view

        why = policy.explain_retention(retention_view(good))
        say(f"checkpoints in {ckpt_dir} ({len(good)}):")
        for e, kept_by in zip(good, why):
            loss = f"  loss {e.metrics['loss']:.4f}" if e.metrics and "loss" in e.metrics else ""
            say(f"  {e.name}  step {e.step}{loss}  saved for: {', '.join(e.reasons) or '-'}"
                f"  kept by: {', '.join(kept_by) or '-'}")
    else:
        say(f"no checkpoint in {ckpt_dir}")
    on_disk = {e.step for e in good}
    removed = read(ckpt_dir).since(began) if began is not None else []
    removed_steps = sorted({e["step"] for e in removed if isinstance(e.get("step"), int)} - on_disk)
    before = set(earlier)
    gone = [s for s in removed_steps if s not in before]
    if gone:
        say(f"removed by retention: step{'s' if len(gone) > 1 else ''} {', '.join(map(str, gone))}")
    gone_before = [s for s in removed_steps if s in before]
    if gone_before:
        say(f"removed by retention: step{'s' if len(gone_before) > 1 else ''} {', '.join(map(str, gone_before))} "
            "saved by an earlier run (the retention of this run's policy no longer keeps them)")
    if trained == 0:
        return
    newest = max(on_disk, default=0)
    if newest >= trained:
        say(f"every trained step is covered: the final step {trained} is saved")
    else:
        lost = trained - newest
        say(f"steps {newest + 1}-{trained} ({lost} step{'s' if lost != 1 else ''} of training) "
            "are in no checkpoint")
