"""The policy document: version, the final guarantee, rules, retention and storage.

``Policy`` is what :func:`saverules.load` returns.  It is immutable; compiling
it gives a stateful :class:`~saverules.engine.decider.Decider` for one run.
"""
from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, PlainValidator, PrivateAttr, ValidationInfo, WithJsonSchema, field_validator

from .limits import SAVE_LIMIT
from .progress import Checkpoint
from .quantities import Bytes, Count, NonNegativeReal, PositiveReal, Seconds
from .rules import Model, Name, Rule, _as_tuple

Position = tuple[int, int]


def _strict_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {type(value).__name__}")
    return value


Bool = Annotated[bool, PlainValidator(_strict_bool), WithJsonSchema({"type": "boolean"})]


def _version(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected the integer 1, got {type(value).__name__}")
    if value != 1:
        raise ValueError(f"unsupported format version {value}: this saverules reads version = 1")
    return value


class RunShape(Model):
    """The run that ``check`` simulates when no flags are given, and what it costs."""

    total_steps: Count | None = None
    steps_per_epoch: Count | None = None
    step_seconds: PositiveReal | None = None
    # the cost report (docs/check.md) and the adaptive rule's simulation
    save_seconds: PositiveReal | None = None
    write_seconds: PositiveReal | None = None
    mtbf: Seconds | None = None
    restart_seconds: NonNegativeReal | None = None
    checkpoint_size: Bytes | None = None
    # the durable tier's upload lag (docs/tiers.md): seconds per upload, or the size over a bandwidth (bytes a second)
    upload_seconds: PositiveReal | None = None
    upload_bandwidth: Bytes | None = None

    @field_validator("write_seconds")
    @classmethod
    def _write_includes_the_stall(cls, write: Any, info: ValidationInfo) -> Any:
        stall = info.data.get("save_seconds")
        if write is not None and stall is not None and write < stall:
            raise ValueError(
                f"write_seconds ({write:g}) must be at least save_seconds ({stall:g}): "
                "the whole write includes the stall"
            )
        return write


class KeepBest(Model):
    metric: Name
    mode: Literal["min", "max"] = "min"
    n: Count = 1


class Retention(Model):
    """Which checkpoints survive. Each rule is a keep-mask; the masks are ORed."""

    keep_last: Count = 1
    keep_every: Count | None = None
    keep_best: KeepBest | None = None


class _UTC:
    """``{time}`` in a name template: compact UTC by default, strftime with a spec."""

    def __init__(self, moment: datetime):
        self.moment = moment.astimezone(timezone.utc)

    def __format__(self, spec: str) -> str:
        return self.moment.strftime(spec or "%Y%m%dT%H%M%SZ")


_PLACEHOLDERS = ("step", "epoch", "time", "run")
_MAX_NAME = 255  # bytes in one path component on common file systems
#: The bytes the store adds to a checkpoint's name while it writes, moves or deletes it:
#: ``.tmp-<name>-<pid>-<8 hex>`` (see saverules.store.layout.hidden_name), at the largest pid Linux can
#: give (pid_max is at most 2**22 = 4194304, 7 digits).  The engine reads no system file: it assumes that.
HIDDEN_NAME_BYTES = len(".tmp-") + len(f"-{1 << 22}-") + 8
_SEPARATORS = ("/", "\\", "\0")


class _NameTooLong(ValueError):
    """A name template that renders a name the store could not write."""


def _render(template: str, step: int, epoch: int, time: datetime | None, run: str) -> str:
    for bad in _SEPARATORS:
        if bad in run:
            raise ValueError(f"run name {run!r} must not contain a path separator")
    name = template.format(
        step=step, epoch=epoch, time=_UTC(time or datetime.now(timezone.utc)), run=run
    )
    if any(bad in name for bad in _SEPARATORS) or name in ("", ".", "..") or name.startswith(".."):
        raise ValueError(f"name template {template!r} renders to {name!r}, which is not a plain directory name")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > _MAX_NAME - HIDDEN_NAME_BYTES:
        raise _NameTooLong(
            f"the name renders to {size} bytes at step {step:,}; a checkpoint's name may "
            f"have at most {_MAX_NAME - HIDDEN_NAME_BYTES} bytes, because while it is written the store names it "
            f"'.tmp-<name>-<pid>-<8 hex>' ({HIDDEN_NAME_BYTES} bytes more) and a file name has at most {_MAX_NAME} "
            "bytes; shorten the template"
        )
    return name


class Storage(Model):
    """Where the checkpoint store writes; read by :mod:`saverules.torch`."""

    dir: Name = "checkpoints"
    name: Name = "step-{step:08d}"
    format: Literal["tensors", "torch", "safetensors", "dcp"] = "tensors"

    @field_validator("dir")
    @classmethod
    def _check_dir(cls, directory: str) -> str:
        # A store lists, verifies and (with [retention]) deletes the checkpoints it finds in its dir: a
        # filesystem root is never a store of its own.  (A pure string check: the engine touches no disk.)
        bare = directory.replace("\\", "/")
        if bare.strip("/") in ("", ".") and bare.startswith("/") or re.fullmatch(r"[A-Za-z]:/*", bare):
            raise ValueError(
                f"dir = {directory!r} is a filesystem root; a checkpoint store needs a folder of its own "
                "(its retention deletes the checkpoints it finds there): name one, for example "
                "dir = \"/checkpoints/my-run\""
            )
        return directory

    @field_validator("name")
    @classmethod
    def _check_template(cls, template: str) -> str:
        try:
            parsed = [(f, spec or "") for _, f, spec, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as exc:
            raise ValueError(f"not a valid name template: {exc}") from None
        fields = [f for f, _ in parsed]
        for field, spec in parsed:
            # a width such as {step:99999999} would render an enormous name
            # (a leading 0 is the zero-padding flag: "{step:0255d}" is 255 wide)
            widths = (digits.lstrip("0") or "0" for digits in re.findall(r"\d+", spec))
            if any(len(width) > 3 or int(width) > _MAX_NAME - HIDDEN_NAME_BYTES for width in widths):
                raise ValueError(
                    f"the format of {{{field}}} asks for a width beyond {_MAX_NAME - HIDDEN_NAME_BYTES} characters, "
                    f"longer than a checkpoint's name can be (a file name has at most {_MAX_NAME} bytes, and the "
                    f"store adds {HIDDEN_NAME_BYTES} while it writes one)"
                )
        for field in fields:
            if field not in _PLACEHOLDERS:
                raise ValueError(
                    f"unknown placeholder {{{field}}}; use {', '.join('{' + p + '}' for p in _PLACEHOLDERS)}"
                )
        if "step" not in fields:
            raise ValueError("the name must contain {step}, or checkpoints would overwrite each other")
        if any(bad in template for bad in _SEPARATORS) or template.startswith(".") or template.startswith("~"):
            raise ValueError(
                "the name must be a plain directory name inside dir: no path separators, "
                "no leading '.', '..' or '~'"
            )
        for step in (1, 123456789):
            try:
                _render(template, step, 3, datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), "run")
            except _NameTooLong:
                raise
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                raise ValueError(f"name template does not render: {exc}") from None
        return template

    def render_name(self, step: int, epoch: int = 0, time: datetime | None = None, run: str = "run") -> str:
        """The checkpoint directory name for this step (a single path component)."""
        return _render(self.name, step, epoch, time, run)


#: Storage option names that carry a secret: refused in ``[durable].options`` (credentials come from the
#: environment each backend reads, never from a policy file).
SECRET_OPTIONS = frozenset({
    "key", "secret", "token", "password", "session_token", "aws_access_key_id", "aws_secret_access_key",
    "aws_session_token", "access_key", "secret_key", "credentials", "client_secret", "sas_token",
    "account_key", "connection_string",
})


def _storage_options(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a table of fsspec storage options, got {type(value).__name__}")
    for key in value:
        if str(key).lower() in SECRET_OPTIONS:
            raise ValueError(
                f"{key!r} is a credential; credentials never go in a policy file: set them in the environment "
                "the backend reads (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL for S3, "
                "GOOGLE_APPLICATION_CREDENTIALS for GCS)"
            )
    return dict(value)


StorageOptions = Annotated[dict[str, Any], PlainValidator(_storage_options), WithJsonSchema({"type": "object"})]


class Durable(Model):
    """The durable tier (docs/tiers.md): where its checkpoints go, when a save is promoted, what it keeps."""

    dir: Name | None = None
    options: StorageOptions = {}
    final: Bool = True
    rules: Annotated[tuple[Rule, ...], BeforeValidator(_as_tuple)] = ()
    retention: Retention | None = None


class Policy(Model):
    """A whole save policy: what to save when, what to keep, and where."""

    version: Annotated[int, PlainValidator(_version), WithJsonSchema({"const": 1})]
    final: Bool = True
    run: RunShape | None = None
    rules: Annotated[tuple[Rule, ...], BeforeValidator(_as_tuple)] = ()
    retention: Retention | None = None
    storage: Storage = Storage()
    durable: Durable | None = None

    _source: str = PrivateAttr(default="<policy>")
    _positions: dict[tuple, Position] = PrivateAttr(default_factory=dict)

    # -- provenance -----------------------------------------------------------
    @property
    def source(self) -> str:
        """The file (or ``<string>``) this policy was loaded from."""
        return self._source

    def position(self, path: tuple) -> Position | None:
        """(line, col) of the key at ``path`` in the source document, if known."""
        return self._positions.get(tuple(path))

    def __eq__(self, other: object) -> bool:
        """Equal policies say the same thing, with the same keys written (provenance aside:
        the same policy loaded from two files is equal)."""
        if not isinstance(other, Policy):
            return NotImplemented
        return self.__dict__ == other.__dict__ and self._written() == other._written()

    def __hash__(self) -> int:
        return hash(self.digest)

    def _written(self) -> dict:
        return self.model_dump(mode="json", exclude_unset=True, exclude_none=True)

    def to_toml(self) -> str:
        """This policy as TOML text that :func:`saverules.loads` reads back to an equal policy.

        Only the keys the policy was given are written, so every rule keeps its reason
        string; the header comment names where the policy came from and its digest.
        """
        from .render import toml_document

        header = f"saverules policy (from {self.source})\ndigest: {self.digest}"
        return toml_document(self._written(), header)

    @property
    def digest(self) -> str:
        """sha256 of the canonical form of the policy: equal for equal policies."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    # -- the two halves: save decision and preservation ---------------------
    def compile(self, total_steps: int | None = None):
        """A fresh :class:`~saverules.engine.decider.Decider` for one run, or, for a policy
        with ``[durable]``, a :class:`~saverules.engine.tiers.TieredDecider` (one per tier).

        ``total_steps`` resolves shares of the run ("5%"); without it the
        decider takes the total from the first Progress that carries one, and
        then from ``[run].total_steps``.
        """
        if self.durable is not None:
            from .tiers import TieredDecider

            return TieredDecider(self, total_steps)
        from .decider import Decider

        return Decider(self, total_steps)

    def retain(self, checkpoints: Sequence[Checkpoint]) -> list:
        """Keep mask aligned with ``checkpoints`` (oldest first): True = keep."""
        from .retention import explain_retention

        return [bool(why) for why in explain_retention(self.retention, checkpoints)]

    def explain_retention(self, checkpoints: Sequence[Checkpoint]) -> list:
        """For each checkpoint, the names of the retention rules that keep it (empty = delete)."""
        from .retention import explain_retention

        return explain_retention(self.retention, checkpoints)

    def simulate(
        self,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        step_seconds: float | None = None,
        metrics: Callable[[int], Mapping[str, float] | None] | None = None,
        max_saves: int | None = SAVE_LIMIT,
        *,
        save_seconds: float | None = None,
        write_seconds: float | None = None,
    ):
        """Simulate a run of this shape without training; see :mod:`saverules.engine.simulate`.

        Every run parameter not passed (``None``) is taken from the policy's
        ``[run]`` table, as ``check`` does: ``total_steps``, ``steps_per_epoch``,
        ``step_seconds`` and ``save_seconds``; ``write_seconds`` too, when
        ``save_seconds`` also comes from ``[run]`` (a write is measured with its stall).
        At most ``max_saves`` saves are listed (``None``: every save, however
        many); the rest are counted, see :attr:`~saverules.engine.simulate.Simulation.complete`.
        ``save_seconds`` (and ``write_seconds``, the stall when omitted) is what
        every save costs; without it ``adaptive`` rules are not simulated.
        """
        from .simulate import simulate

        run = self.run
        if run is not None:
            total_steps = run.total_steps if total_steps is None else total_steps
            steps_per_epoch = run.steps_per_epoch if steps_per_epoch is None else steps_per_epoch
            step_seconds = run.step_seconds if step_seconds is None else step_seconds
            if save_seconds is None and run.save_seconds is not None:
                save_seconds = run.save_seconds
                write_seconds = run.write_seconds if write_seconds is None else write_seconds
        if total_steps is None:
            raise ValueError(
                f"Policy.simulate() needs the run's length: pass total_steps=..., or set total_steps in the "
                f"[run] table of {self.source}"
            )
        return simulate(self, total_steps, steps_per_epoch, step_seconds, metrics, max_saves,
                        save_seconds=save_seconds, write_seconds=write_seconds)
