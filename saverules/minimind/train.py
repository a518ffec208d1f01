"""Pretrain a small minimind-style language model, with saves decided by a saverules policy.

    python -m saverules.minimind.train --max_steps 200
    python -m saverules.minimind.train --resume                   # continue from the latest checkpoint
    python -m saverules.minimind.train --rules tiers.toml --durable s3://bucket/run1   # and a durable tier
    torchrun --nproc_per_node 2 -m saverules.minimind.train       # data parallel (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node 2 -m saverules.minimind.train --fsdp  # sharded (FSDP2), sharded checkpoints

The loop reads top to bottom: arguments, process group, data, model,
optimizer, checkpointer, resume, train, summary.  It has no save condition of
its own: after every optimizer step it hands the step's progress to
``Checkpointer.step_at`` and the policy in ``--rules`` decides.  With a
``[durable]`` table in the policy (or ``--durable URL``) the checkpointer also
promotes checkpoints to a durable tier in the background; the run exits 1 when
its final step did not reach it.  See docs/training.md and docs/tiers.md.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    from saverules import Decision
    from saverules.store.checkpointer import Checkpointer

DEFAULT_RULES = "rules/default.toml"


class UsageError(Exception):
    """A problem with the arguments or input files: printed as one line, exit status 2."""


class RunError(Exception):
    """The run cannot go on from what is on disk (no checkpoint resume can use, a store another
    process writes, a directory that cannot be written): printed, exit status 1."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m saverules.minimind.train",
        description="Pretrain a minimind-style model; a saverules policy decides every checkpoint save.",
    )
    p.add_argument("--out_dir", default="out", help="run folder: checkpoints go to OUT_DIR/<storage.dir of the policy>")
    p.add_argument("--rules", default=None,
                   help=f"save policy (TOML); default {DEFAULT_RULES}, else the copy packaged with saverules")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in the run folder, or in the durable tier when it is newer")
    p.add_argument("--durable", default=None, metavar="URL",
                   help="the durable tier (s3://bucket/run, gs://..., file://..., memory://..., or a path): overrides "
                        "[durable].dir of the policy, which must have a [durable] table (docs/tiers.md)")
    p.add_argument("--durable_timeout", type=float, default=None, metavar="SECONDS",
                   help="at the end (or on SIGTERM), wait at most this long for the uploads to the durable tier "
                        "(default: until they are done); exit status 1 when the final step did not reach it")
    p.add_argument("--fsdp", action="store_true",
                   help="shard the model and optimizer over the ranks with FSDP2 (fully_shard) and save sharded "
                        "checkpoints ([storage].format = \"dcp\"); --resume may then use another number of ranks")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=16, help="micro-batch size per process")
    p.add_argument("--learning_rate", type=float, default=5e-4, help="peak learning rate (cosine decay to 10%%)")
    p.add_argument("--warmup_steps", type=int, default=None,
                   help="linear warmup, in optimizer steps (default: 2%% of the run, at most 100)")
    p.add_argument("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clip; 0 disables")
    p.add_argument("--log_interval", type=int, default=50,
                   help="every this many steps: log a line (without a progress bar) and report the loss to the policy")
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps in total")
    p.add_argument("--preset", default="tiny", help="model size: tiny or small")
    p.add_argument("--hidden_size", type=int, default=None)
    p.add_argument("--num_hidden_layers", type=int, default=None)
    p.add_argument("--max_seq_len", type=int, default=None)
    p.add_argument("--data_path", default=None,
                   help="JSONL pretraining data ({\"text\": ...} per line); default: a small built-in synthetic corpus")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (needs the tokenizers package); default: the built-in byte tokenizer")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype on GPU (auto: bfloat16 where supported); CPU always trains in float32")
    p.add_argument("--cpu_threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; under DDP the cores split between ranks)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels and one CPU thread: a resumed run matches an uninterrupted one bitwise")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "log", "none"],
                   help="auto: a tqdm bar on a terminal, log lines otherwise")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "accumulation_steps", "log_interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        p.error(f"--cpu_threads must be at least 1, got {args.cpu_threads}")
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max_steps must be at least 1, got {args.max_steps}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        p.error(f"--warmup_steps must be >= 0, got {args.warmup_steps}")
    if not args.learning_rate > 0:
        p.error(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.grad_clip < 0:
        p.error(f"--grad_clip must be >= 0, got {args.grad_clip}")
    if args.durable is not None and not args.durable.strip():
        p.error("--durable must not be empty: give the durable tier's URL (s3://bucket/run1) or path")
    if args.durable_timeout is not None and not args.durable_timeout >= 0:
        p.error(f"--durable_timeout must be >= 0 seconds, got {args.durable_timeout}")
    return args


def rules_path(given: str | None) -> str:
    """The policy file: ``--rules``, else rules/default.toml here, else the packaged copy."""
    if given is not None:
        if not Path(given).is_file():
            raise UsageError(f"--rules {given}: no such file (give the path of a saverules TOML policy)")
        return given
    if Path(DEFAULT_RULES).is_file():
        return DEFAULT_RULES
    from importlib import resources

    packaged = resources.files("saverules").joinpath("rules").joinpath("default.toml")
    if packaged.is_file():
        return str(packaged)
    raise UsageError(f"no {DEFAULT_RULES} here and no packaged default policy; pass --rules PATH")


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """LR multiplier after ``step`` optimizer steps: linear warmup, then cosine from 1 to 0.1."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class LoopState:
    """The loop's own counters, saved in every checkpoint as plain values."""

    def __init__(self, **values: Any) -> None:
        self.values = dict(values)

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, d: dict) -> None:
        self.values.update(d)


class RNGState:
    """Captures the RNG states when a checkpoint is written, restores them on resume."""

    def __init__(self, rng_state, restore_rng_state) -> None:
        self._get, self._set = rng_state, restore_rng_state

    def state_dict(self) -> dict:
        return self._get()

    def load_state_dict(self, d: dict) -> None:
        self._set(d)


@dataclass(frozen=True)
class StepReport:
    """What ``train(after_step=...)`` is given after every optimizer step, once the policy has decided."""

    step: int                  # optimizer steps done, resumed ones included
    total_steps: int
    decision: Decision         # the policy's decision for this step (saved or not, and why)
    signal: str | None         # the signal the ranks agreed on at this step ("SIGTERM", "SIGUSR1"), if any
    checkpointer: Checkpointer


def regrouped_batch(saved: dict, world: int) -> int:
    """The per-rank batch that keeps a checkpoint's global batch on ``world`` ranks (UsageError if none does)."""
    batch, old = saved.get("batch_size"), saved.get("world_size")
    if not isinstance(batch, int) or not isinstance(old, int):
        raise UsageError("--resume: the checkpoint does not record its batch size and world size")
    global_batch = batch * old
    if global_batch % world:
        raise UsageError(
            f"--resume: the checkpoint was trained with a global batch of {global_batch} ({old} rank(s) x {batch}), "
            f"which {world} ranks cannot split evenly; resume on a number of ranks that divides {global_batch}")
    return global_batch // world


def fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def main(argv=None, *, clock: Callable[[], float] | None = None,
         after_step: Callable[[StepReport], None] | None = None,
         restore: Callable[[dict[str, Any]], None] | None = None,
         extra_state: Mapping[str, Any] | None = None) -> int:
    """The command line: parse ``argv``, train, and turn usage and run errors into exit statuses 2 and 1."""
    args = parse_args(argv)
    try:
        return train(args, clock=clock, after_step=after_step, restore=restore, extra_state=extra_state)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def train(args: argparse.Namespace, *, clock: Callable[[], float] | None = None,
          after_step: Callable[[StepReport], None] | None = None,
          restore: Callable[[dict[str, Any]], None] | None = None,
          extra_state: Mapping[str, Any] | None = None) -> int:
    """Train as ``args`` say; the exit status.

    ``clock``: the training time in seconds that the policy sees, read once per optimizer step
    (default: the checkpointer's clock, which continues across resumes). ``after_step``: called
    after every optimizer step with a :class:`StepReport` (to log decisions, or to stop or signal
    the run from outside); it runs before the loop checks whether to stop. ``restore``: with
    ``--resume``, called with the state (``model``, ``optimizer``, ``scheduler``, ``loop``, ...)
    to load it from somewhere of the caller's instead of the store's ``load_latest`` (the time-to-resume
    benchmark resumes the same loop from a bare ``torch.load`` this way). ``extra_state``: more
    entries for the saved state (objects with ``state_dict``/``load_state_dict``, or plain values),
    saved and resumed with the loop's own; a name the loop uses itself is refused.
    """
    try:
        import torch
        import torch.distributed as dist
        from tqdm import tqdm
    except ImportError as e:
        raise UsageError(f"the training loop needs torch and tqdm ({e}); pip install 'saverules[torch]'") from None

    import saverules
    from saverules.engine.tiers import promoted
    from saverules.minimind.data import (
        PretrainDataset,
        ResumableSampler,
        default_corpus,
        load_tokenizer,
        resume_point,
    )
    from saverules.minimind.model import MiniMindLM, config_for
    from saverules.minimind.summary import print_durable_summary, print_summary
    from saverules.store.errors import DurableError
    from saverules.torch import Checkpointer, CheckpointError, restore_rng_state, rng_state, scan

    # ---- process group and device ------------------------------------------------
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ddp = world > 1
    if args.device == "auto":
        use_cuda = torch.cuda.is_available()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device}: not a device (use auto, cpu, cuda or cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available here")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if ddp else 0
    master = rank == 0
    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)
    elif ddp and device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False

    def say(msg: str) -> None:
        if master:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    # ---- policy --------------------------------------------------------------------
    rules = rules_path(args.rules)
    try:
        policy = saverules.load(rules)
    except saverules.PolicyError as e:
        raise UsageError(f"{rules}: the save policy is invalid:\n{e}") from None
    except OSError as e:
        raise UsageError(f"--rules {rules}: cannot read it ({e.strerror or e})") from None

    if args.durable is not None and policy.durable is None:
        raise UsageError(f"--durable {args.durable}: the policy {rules} has no [durable] table, so nothing says when "
                         "to save to the durable tier; add one (see docs/tiers.md), e.g.\n"
                         "  [durable]\n  [[durable.rules]]\n  kind = \"every_steps\"\n  every = 1000")
    if args.durable_timeout is not None and policy.durable is None:
        raise UsageError(f"--durable_timeout: the policy {rules} has no [durable] table, so nothing is uploaded")

    if args.fsdp and policy.storage.format != "dcp":
        # Sharded training saves sharded checkpoints: every rank writes its own shards.
        say(f"--fsdp: saving with [storage].format = \"dcp\" (the policy says {policy.storage.format!r})")
        policy = policy.model_copy(update={"storage": policy.storage.model_copy(update={"format": "dcp"})})

    # ---- data ------------------------------------------------------------------------
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"--tokenizer: {e}") from None
    try:
        cfg = config_for(args.preset, hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                         max_seq_len=args.max_seq_len, vocab_size=tokenizer.vocab_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        source = args.data_path if args.data_path is not None else default_corpus(seed=args.seed)
        dataset = PretrainDataset(source, tokenizer, cfg.max_seq_len)
    except (OSError, ValueError) as e:
        raise UsageError(f"--data_path: {e}") from None
    sampler = ResumableSampler(dataset, seed=args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                         pin_memory=device.type == "cuda")
    batches_per_epoch = sampler.batches_per_epoch(args.batch_size)
    accum = args.accumulation_steps
    # Every epoch ends with an update: a last window shorter than accum is applied, not carried over.
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(100, total_steps // 50)

    # ---- model and optimizer ---------------------------------------------------------
    torch.manual_seed(args.seed)
    model = MiniMindLM(cfg).to(device)
    amp_dtype = None
    if device.type == "cuda" and args.dtype != "float32":
        amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
        if amp_dtype is None:  # auto
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    fsdp_model: FSDPModule | None = None  # set with --fsdp under torchrun
    ddp_model: DistributedDataParallel | None = None  # set under torchrun otherwise
    train_model: torch.nn.Module = model
    if args.fsdp and ddp:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:  # one FSDP unit per block, the rest (tied embedding, norm) at the root
            fully_shard(block)
        fsdp_model = fully_shard(model)  # the model itself, its class now an FSDPModule
    elif ddp:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        train_model = ddp_model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.1, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, total_steps, warmup))

    # ---- checkpointer ------------------------------------------------------------------
    ckpt_dir = Path(policy.storage.dir)
    if not ckpt_dir.is_absolute():
        ckpt_dir = Path(args.out_dir) / ckpt_dir
    loop = LoopState(step=0, epoch=0, batches_done=0, batch_size=args.batch_size, accumulation_steps=accum,
                     world_size=world, seed=args.seed, total_steps=total_steps, dataset_len=len(dataset))
    state = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "loop": loop,
        "rng": RNGState(rng_state, restore_rng_state),
        "model_config": cfg.to_dict(),
        "args": {k: v for k, v in vars(args).items()},
    }
    for name, value in (extra_state or {}).items():
        if name in state:
            raise UsageError(f"extra_state: {name!r} is a name the loop's own state uses "
                             f"({', '.join(state)}); give the entry another name")
        state[name] = value
    # The loop stops on SIGTERM even when the policy does not save for it; under DDP every rank
    # must stop at the same step, so the ranks agree on signals (at sync steps) all the same.
    has_signal_rule = policy.compile().watches_signals
    sync = {"sync_signals": True} if ddp and not has_signal_rule else None
    try:
        ckpt = Checkpointer(policy, dir=str(ckpt_dir), sync=sync, durable=args.durable)
    except CheckpointError as e:  # another run writes there (either tier), or it cannot be written or reached
        raise RunError(str(e)) from None
    durable = ckpt.durable  # the durable tier (DurableTier; read-only on ranks that do not write), or None
    if durable is not None:
        say(f"durable tier: {durable.url} (uploads in the background)")

    # ---- resume -------------------------------------------------------------------------
    if args.resume and restore is not None:
        restore(state)
        say(f"resumed from step {loop.values['step']} by the caller's restore")
    elif args.resume:
        try:
            # Checkpoints that are all unusable stop the run: a requeued job must never quietly
            # throw its progress away and report success.
            resumed = ckpt.load_latest(state, map_location=device)
        except CheckpointError as e:
            raise RunError(f"--resume: {e}\nInspect them with `python -m saverules.ls {ckpt_dir}`; to start over, "
                           "move them away or choose another --out_dir.") from None
        if resumed is None:
            say(f"--resume: no checkpoint in {ckpt_dir}; starting from scratch")
        else:
            saved = loop.values
            if args.fsdp and saved.get("world_size") != world:
                # A sharded checkpoint loads on any number of ranks: keep the global batch (and with it
                # the steps, the learning-rate schedule and the data order) by splitting it anew.
                args.batch_size = regrouped_batch(saved, world)
                say(f"--resume: the checkpoint at step {resumed.step} was trained on {saved.get('world_size')} "
                    f"rank(s) with {saved.get('batch_size')} per rank; {world} rank(s) take {args.batch_size} "
                    f"each (the same global batch of {args.batch_size * world})")
                sampler = ResumableSampler(dataset, seed=args.seed)
                loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                                     pin_memory=device.type == "cuda")
                batches_per_epoch = sampler.batches_per_epoch(args.batch_size)
                steps_per_epoch = math.ceil(batches_per_epoch / accum)
                total_steps = args.epochs * steps_per_epoch
                if args.max_steps is not None:
                    total_steps = min(total_steps, args.max_steps)
                loop.values.update(batch_size=args.batch_size, world_size=world)
            for key, now in (("batch_size", args.batch_size), ("accumulation_steps", accum),
                             ("world_size", world), ("seed", args.seed), ("dataset_len", len(dataset))):
                if saved.get(key) != now:
                    raise UsageError(
                        f"--resume: the checkpoint at step {resumed.step} was trained with {key}={saved.get(key)}, "
                        f"this run has {key}={now}; resume with the same value or start a new --out_dir")
            # epochs are printed 1-based, as in the log lines ("epoch 1/1")
            tier, name = ckpt.resumed_from or ("local", "")
            where = f"{ckpt_dir}"
            if tier == "durable":  # the local tier had none as new (a new node): downloaded first
                where = f"the durable tier {durable.url if durable is not None else ''} ({name}, copied to {ckpt_dir})"
            say(f"resumed from step {resumed.step} (epoch {int(loop.values['epoch']) + 1}/{args.epochs}) "
                f"in {where}")
    else:
        present = scan(ckpt_dir, verify=False)  # damaged ones count too: this folder belongs to a run
        if present:
            steps = [i.step for i in present if i.step is not None]
            latest = f"latest: step {max(steps)}" if steps else "none of them readable"
            raise UsageError(f"{ckpt_dir} already holds checkpoints ({latest}); "
                             "pass --resume to continue that run or choose another --out_dir")
        if durable is not None:
            remote = durable.list()
            if remote:
                raise UsageError(f"the durable tier {durable.url} already holds checkpoints (latest: step "
                                 f"{remote[-1].step}); pass --resume to continue that run or give another --durable")
    step = int(loop.values["step"])
    batches_done = int(loop.values["batches_done"])
    loop.values["total_steps"] = total_steps
    start_step = step
    if step >= total_steps:  # only after --resume: a checkpoint at or past the total asked for
        asked = (f"--max_steps {args.max_steps}" if args.max_steps is not None and args.max_steps == total_steps
                 else f"--epochs {args.epochs} of {steps_per_epoch} steps")
        ckpt.close()
        if ddp:
            dist.destroy_process_group()
        if step == total_steps:
            say(f"--resume: the checkpoint at step {step} already completes this run ({total_steps} steps, "
                f"{asked}); nothing to train, nothing saved")
            return 0
        raise UsageError(
            f"--resume: the checkpoint at step {step} is already past the {total_steps} steps this run asks for "
            f"({asked}); nothing was trained or saved. To train on, pass a --max_steps above {step} (and enough "
            "--epochs); to train a shorter run, start from scratch in another --out_dir")
    # what earlier runs left here, and when this run began: the summary accounts for each checkpoint this run's
    # retention removes, from the store's removal log (the one `saverules.ls` lists)
    earlier = sorted(e.step for e in ckpt.list() if e.ok and e.step is not None) if master and args.resume else []
    began = time.time()

    # ---- signals ---------------------------------------------------------------------------
    pending = {"signal": None}

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if pending["signal"] != "SIGTERM":  # a stop request outranks a save request
            pending["signal"] = name

    signal.signal(signal.SIGTERM, on_signal)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, on_signal)
    if not has_signal_rule:
        say(f"note: {rules} has no on_signal rule: SIGTERM will stop training without a save")

    clock = clock if clock is not None else ckpt.clock  # the training time the policy sees

    # ---- train ------------------------------------------------------------------------------
    show_bar = master and (args.progress == "bar" or (args.progress == "auto" and sys.stderr.isatty()))
    log_lines = master and not show_bar and args.progress != "none"
    bar = tqdm(total=total_steps, initial=step, disable=not show_bar, unit="step", dynamic_ncols=True,
               file=sys.stderr)
    say(f"training {model.num_parameters():,} parameters on {device}{f' x{world}' if ddp else ''}: "
        f"{total_steps} steps ({steps_per_epoch} per epoch, {accum} micro-batch(es) of {args.batch_size} each), "
        f"policy {rules}, checkpoints in {ckpt_dir}")
    saves: list = []
    stop_signal = None
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    last_loss = float("nan")
    t_start = time.perf_counter()
    start_epoch, start_batch = resume_point(batches_done, batches_per_epoch)
    train_model.train()
    done = step >= total_steps
    for epoch in range(start_epoch, args.epochs):
        if done:
            break
        sampler.set_epoch(epoch)
        if epoch == start_epoch:
            sampler.set_start(start_batch, args.batch_size)
        micro = start_batch if epoch == start_epoch else 0  # index of the next micro-batch in this epoch
        window_loss = torch.zeros((), device=device)
        for input_ids, labels in loader:
            window_start = micro - micro % accum
            window = min(accum, batches_per_epoch - window_start)  # the epoch's last window may be short
            update = micro + 1 == window_start + window
            input_ids = input_ids.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if fsdp_model is not None:  # FSDP2 reduces gradients only on the micro-batch that ends the window
                fsdp_model.set_requires_gradient_sync(update)
                sync_grads: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            else:
                sync_grads = ddp_model.no_sync() if ddp_model is not None and not update else contextlib.nullcontext()
            with sync_grads:
                with autocast():
                    _, loss = train_model(input_ids, labels)
                    loss = loss / window
                scaler.scale(loss).backward()
            window_loss += loss.detach()
            micro += 1
            batches_done += 1
            if not update:
                continue

            # -- one optimizer step --
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            loss_sum += window_loss
            loss_count += 1
            window_loss = torch.zeros((), device=device)
            epoch_end = micro == batches_per_epoch
            is_last = step >= total_steps
            loop.values.update(step=step, epoch=epoch, batches_done=batches_done)

            metrics = None
            if step % args.log_interval == 0 or is_last:
                last_loss = (loss_sum / loss_count).item()
                metrics = {"loss": last_loss}
                loss_sum.zero_()
                loss_count = 0
            sig = pending["signal"] or False
            pending["signal"] = None

            # -- the policy decides; this is the only place a checkpoint is written --
            # (step_at is step(Progress(...), state) without building the Progress on a quiet step)
            decision = ckpt.step_at(step, state, total_steps=total_steps, epoch=epoch, epoch_end=epoch_end,
                                    is_last=is_last, time=clock(), metrics=metrics, signal=sig)

            # Under DDP the decider reports the signals every rank agreed on (at a sync step);
            # stopping on those, not on this rank's own, makes all ranks stop at the same step.
            agreed = ckpt.decider.last_signals if ddp else ((sig,) if sig else ())
            if decision.save:
                saves.append((step, decision.reasons))
                # with a durable tier, a save its rules chose (or a signal save) is uploaded in the background
                up = promoted(decision) if durable is not None else ()
                to_durable = f"; to the durable tier for: {', '.join(up)}" if up else ""
                say(f"saved step {step}: {', '.join(decision.reasons) or '(no local rule)'}{to_durable}")

            bar.update(1)
            if metrics is not None:
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                if log_lines:
                    rate = (step - start_step) / max(1e-9, time.perf_counter() - t_start)
                    eta = (total_steps - step) / rate if rate > 0 else 0.0
                    print(f"step {step}/{total_steps} epoch {epoch + 1}/{args.epochs} loss {last_loss:.4f} "
                          f"lr {lr:.2e} {rate:.1f} steps/s eta {fmt_seconds(eta)}", flush=True)

            if after_step is not None:
                after_step(StepReport(step, total_steps, decision, str(agreed[0]) if agreed else None, ckpt))
            if "SIGTERM" in agreed:
                stop_signal = "SIGTERM"
                done = True
                break
            if is_last:
                done = True
                break
    bar.close()

    # ---- summary ----------------------------------------------------------------------------
    # close() waits for the last local write, then for the uploads (a bar in bytes, at most
    # --durable_timeout), and raises DurableError when the final step did not reach the durable tier.
    not_durable = None
    if durable is not None:
        say(f"waiting for the uploads to {durable.url}"
            + (f" (at most {args.durable_timeout:g}s)" if args.durable_timeout is not None else ""))
    try:
        ckpt.close(timeout=args.durable_timeout)
    except DurableError as e:
        not_durable = str(e)
    if master:
        trained = step
        listing = list(ckpt.list())
        print_summary(say, policy, ckpt_dir, listing, saves, start_step, trained, total_steps, stop_signal, earlier,
                      began)
    if master and durable is not None:
        print_durable_summary(say, policy, durable, step, not_durable)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    if not_durable is not None:
        print(f"error: {not_durable}", file=sys.stderr)
        return 1
    if stop_signal and not (saves and saves[-1][0] == step):
        return 128 + int(signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
