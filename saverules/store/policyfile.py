"""``policy.toml`` in the store's root: the whole policy (its file's text, or ``Policy.to_toml()``), for ``saverules.ls``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..engine.errors import PolicyError
from ..engine.loader import loads
from .commit import write_small_file
from .errors import log, warn
from .layout import POLICY_FILE


def policy_text(policy: Any) -> str:
    """TOML that :func:`saverules.loads` reads back into an equal policy: the text of the file
    the policy was loaded from while it still says the same (its comments kept), else
    ``Policy.to_toml()``."""
    source = policy.source
    if source and not source.startswith("<"):
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
            if loads(text, source) == policy:
                return text
        except (OSError, UnicodeDecodeError, PolicyError):
            pass  # the file changed or went away since: render the policy itself
    return policy.to_toml()


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
