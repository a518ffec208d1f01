"""``policy.toml`` in the store's root: the policy (or its retention and storage), for ``saverules.ls``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .commit import write_small_file
from .errors import log, warn
from .layout import POLICY_FILE


def policy_text(policy: Any) -> str:
    """TOML that :func:`saverules.loads` reads back into a policy with the same retention and storage."""
    source = getattr(policy, "source", None)
    if isinstance(source, str) and source and not source.startswith("<"):
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
            import saverules

            if saverules.loads(text, source).digest == policy.digest:
                return text
        except Exception:
            pass
    lines = [
        "# Written by saverules.torch: the policy was not loaded from a file, so only the parts",
        "# that `python -m saverules.ls` needs (retention and storage) are recorded here.",
        f"# digest of the full policy: {policy.digest}",
        "version = 1",
    ]
    ret = getattr(policy, "retention", None)
    if ret is not None:
        lines.append("")
        lines.append("[retention]")
        lines.append(f"keep_last = {int(ret.keep_last)}")
        if ret.keep_every is not None:
            lines.append(f"keep_every = {int(ret.keep_every)}")
        if ret.keep_best is not None:
            kb = ret.keep_best
            lines.append("")
            lines.append("[retention.keep_best]")
            lines.append(f"metric = {json.dumps(kb.metric)}")
            lines.append(f"mode = {json.dumps(kb.mode)}")
            lines.append(f"n = {int(kb.n)}")
    st = policy.storage
    lines += ["", "[storage]", f"dir = {json.dumps(st.dir)}", f"name = {json.dumps(st.name)}",
              f"format = {json.dumps(st.format)}", ""]
    return "\n".join(lines)


def write_policy_file(root: Path, policy: Any) -> None:
    """Write ``root/policy.toml`` unless it already says the same; never fatal (only ``saverules.ls`` reads it)."""
    target = root / POLICY_FILE
    try:
        text = policy_text(policy)
    except Exception as exc:
        log.warning("could not render the policy for %s: %s", target, exc)
        return
    try:
        with open(target, encoding="utf-8") as f:
            if f.read() == text:
                return
    except OSError:
        pass
    try:
        write_small_file(root, POLICY_FILE, text.encode("utf-8"))
    except OSError as exc:
        warn(f"saverules: could not write {target} (used by `python -m saverules.ls`): {exc}")
