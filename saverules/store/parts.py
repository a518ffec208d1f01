"""The parts a :class:`~saverules.store.checkpointer.Checkpointer` is made of, from its arguments.

Each argument is checked when the Checkpointer is made (:func:`check_arguments`,
:func:`load_policy`, :func:`storage_format`, :func:`durable_arguments`), never
at a save; then the parts are built: the decider (:func:`make_decider`: the
policy compiled, wrapped under DDP so that every rank decides alike) and the
committer (:func:`committer_for`: local or sharded, inside :func:`tiered`,
which adds the durable tier when there is one).  The trainer callbacks build
their policy and decider with the same functions.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engine.tiers import durable_policy
from . import formats, ranks
from .commit import Committer, LocalCommitter
from .errors import CheckpointError, type_name
from .remote.committer import TieredCommitter
from .remote.retry import Retries

if TYPE_CHECKING:
    from ..distributed import SyncedDecider
    from ..engine.decider import Decider
    from ..engine.tiers import TieredDecider

VERIFY_CHOICES = ("hash", "device", "load", "none")
ON_ERROR_CHOICES = ("raise", "warn")


def tiered(inner: Committer, root: Path, policy: Any, url: str | None, options: Mapping[str, Any] | None,
           retries: Retries | None, *, lock: bool, downloads: bool, released: Any,
           uploader: Any = None, world_size: int = 1, commit_timeout: float | None = None) -> TieredCommitter:
    """The committer of a store with its durable tier (when ``url``); the tier opens in ``open()``.

    ``uploader(tier)``, when given, makes the upload strategy of the promotions (a sharded store's: every
    rank uploads its own files); by default the tier's own ``upload``.  ``downloads``: this process takes
    part in a resume's download from the durable tier; under DDP (``world_size`` > 1) rank 0 downloads and
    a broadcast tells the other ranks, so that none reads the store before the download is in place.
    """
    from .remote.promote import PROMOTION_RETRIES
    from .remote.retry import DEFAULT

    opener = None
    if url is not None:
        from .remote.tier import DurableTier
        from .sharded import ShardedCommitter

        if isinstance(inner, ShardedCommitter):  # every rank uploads its files, rank 0 commits (docs/distributed.md)
            from .remote.sharded import ShardedTieredCommitter, sharded_tier

            opener, sharded_uploader = sharded_tier(inner.ranks, url, options, retries or DEFAULT, writer=lock)
            # a resume: rank 0 downloads, every rank learns what it fetched (so every writing rank takes part)
            return ShardedTieredCommitter(inner, root, durable_policy(policy), open_tier=opener, released=released,
                                          downloads=inner.writes, retries=retries or PROMOTION_RETRIES,
                                          uploader=uploader or sharded_uploader, ranks=inner.ranks)
        else:
            def opener() -> DurableTier:
                return DurableTier(url, options, writer=lock, retries=retries or DEFAULT)

            if world_size > 1:  # DDP: rank 0 writes and downloads, every rank resumes what it fetched
                from .remote.committer import AgreedTieredCommitter

                return AgreedTieredCommitter(inner, root, durable_policy(policy), open_tier=opener,
                                             released=released, downloads=downloads,
                                             retries=retries or PROMOTION_RETRIES, uploader=uploader,
                                             ranks=ranks.Ranks(ranks.timeout_from(commit_timeout)))
            downloads = downloads and lock

    return TieredCommitter(inner, root, durable_policy(policy), open_tier=opener, released=released,
                           downloads=downloads, retries=retries or PROMOTION_RETRIES, uploader=uploader)


def durable_arguments(policy: Any, durable: Any, options: Any, retries: Any) -> tuple[str | None, dict | None]:
    """The durable tier's URL and storage options, from the arguments over ``[durable]``; ValueError naming
    the argument that does not fit."""
    table = getattr(policy, "durable", None)
    if durable is not None:
        if not isinstance(durable, (str, os.PathLike)) or not os.fspath(durable):
            raise ValueError(f"durable must be a URL or a path (a non-empty string), got {durable!r}")
        if table is None:
            raise ValueError(
                f"durable={os.fspath(durable)!r} was given, but the policy has no [durable] table: add one (its "
                "rules say which saves are promoted to the durable tier, see docs/tiers.md), e.g.\n"
                '[durable]\n[[durable.rules]]\nkind = "every_steps"\nevery = 1000'
            )
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"durable_options must be a mapping of fsspec storage options or None, got "
                         f"{type_name(options)}")
    if retries is not None and not isinstance(retries, Retries):
        raise ValueError(f"durable_retries must be a saverules.store.remote.retry.Retries or None, got "
                         f"{type_name(retries)}")
    if table is None:
        if options is not None:
            raise ValueError("durable_options was given, but the policy has no [durable] table (see docs/tiers.md)")
        return None, None
    url = os.fspath(durable) if durable is not None else table.dir
    if url is None:
        raise ValueError(
            "the policy's [durable] table has no dir: set [durable].dir (an fsspec URL such as s3://bucket/run, or "
            "a path) or pass durable=URL"
        )
    opts = dict(options) if options is not None else dict(table.options)
    from .remote.url import check_options

    try:
        check_options(opts, "durable_options" if options is not None else "[durable].options")
    except CheckpointError as exc:
        raise ValueError(str(exc)) from None
    return str(url), opts


def committer_for(fmt: Any, root: Path, verify: str, commit_timeout: float | None, *, writes: bool,
               read_only: bool) -> Committer:
    """How this process commits: a sharded format's ranks (every rank writes, rank 0 commits), else locally."""
    group = ranks.for_format(fmt, commit_timeout)
    if group is not None:
        from .sharded import ShardedCommitter

        return ShardedCommitter(group, root, fmt, verify, writes=not read_only)
    return LocalCommitter(root, fmt, verify, writes=writes)


# -- the arguments, checked when a Checkpointer is made ------------------------------------


class PolicyArgumentError(TypeError, ValueError):
    """``policy=`` is neither a policy nor a path: a TypeError, and the ValueError the Checkpointer always raised."""


def load_policy(policy: Any, owner: str = "Checkpointer") -> Any:
    """A :class:`saverules.Policy` as given, or loaded from the path of its TOML file.

    ``owner`` names the caller in the error for anything that is neither a policy nor a path
    (:class:`PolicyArgumentError`, a ``TypeError`` and a ``ValueError``).  A path that cannot be
    read or loaded is a :class:`~saverules.PolicyError` that names the file.
    """
    import saverules

    if isinstance(policy, (str, os.PathLike)):
        return saverules.load(policy)  # a file that cannot be read is a PolicyError naming it
    if not (hasattr(policy, "compile") and hasattr(policy, "storage") and hasattr(policy, "retain")):
        raise PolicyArgumentError(
            f"{owner}(policy=...) takes a saverules.Policy or the path of a policy TOML file, got {type_name(policy)}"
        )
    return policy


def check_arguments(*, dir: str | os.PathLike | None, read_only: Any, async_save: Any, verify: Any,
                    on_error: Any, run_name: Any) -> None:
    """Raise ``ValueError`` naming the first argument that is not one the checkpointer takes."""
    if dir is not None and not isinstance(dir, (str, os.PathLike)):
        raise ValueError(f"dir must be a path or None, got {type_name(dir)}")
    if dir is not None and not os.fspath(dir):
        raise ValueError("dir must not be empty")
    if not isinstance(read_only, bool):
        raise ValueError(f"read_only must be True or False, got {read_only!r}")
    if not isinstance(async_save, bool):
        raise ValueError(f"async_save must be True or False, got {async_save!r}")
    if verify not in VERIFY_CHOICES:
        raise ValueError(f"verify must be one of {', '.join(map(repr, VERIFY_CHOICES))}, got {verify!r}")
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {', '.join(map(repr, ON_ERROR_CHOICES))}, got {on_error!r}")
    if not isinstance(run_name, str) or not run_name or any(c in run_name for c in "/\\\0"):
        raise ValueError(f"run_name must be a non-empty string without path separators, got {run_name!r}")


def storage_format(policy: Any) -> Any:
    """The format ``[storage].format`` names, once its dependencies are known to be installed."""
    fmt = policy.storage.format
    if fmt not in formats.names():
        raise ValueError(
            f"[storage].format must be {' or '.join(map(repr, formats.names()))}, got {fmt!r}"
        )
    found = formats.get(fmt)
    found.check_available()
    return found


def make_decider(policy: Any, total_steps: int | None, world_size: int,
                 sync: Mapping[str, Any] | None) -> Decider | TieredDecider | SyncedDecider:
    """The policy compiled; under DDP (``world_size`` > 1) wrapped so that every rank decides alike.

    The Checkpointer and both trainer callbacks make their decider here.  ``sync`` holds
    :class:`~saverules.distributed.SyncedDecider`'s options (``sync_seconds``, ``max_interval``,
    ``metrics_synced``, ``sync_signals``); in one process they have nothing to do.
    """
    if sync is not None and not isinstance(sync, Mapping):
        raise ValueError(f"sync must be a mapping of SyncedDecider options or None, got {type_name(sync)}")
    decider: Decider = policy.compile(total_steps)
    if world_size > 1:
        from saverules.distributed import SyncedDecider

        # Under DDP every rank must take the same decision: see docs/distributed.md.
        return SyncedDecider(decider, **dict(sync or {}))
    return decider
