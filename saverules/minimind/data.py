"""Tokenizers, pretraining data and a resumable sampler for the reference loop.

Pieces:

* :class:`ByteTokenizer` -- UTF-8 bytes as ids 0..255 plus ``pad``/``bos``/``eos``
  specials (ids 256, 257, 258; ``vocab_size`` 259).  :func:`load_tokenizer`
  returns it for ``None`` or wraps a Hugging Face ``tokenizer.json`` (needs the
  optional ``tokenizers`` package) behind the same interface.
* JSONL pretraining data, one ``{"text": "..."}`` object per line.
  :func:`read_jsonl_texts` reads it with line-numbered errors;
  :func:`write_jsonl` writes it.
* :class:`PretrainDataset` -- fixed-length ``(input_ids, labels)`` items.
* :func:`default_corpus` / :func:`default_dataset` -- a small deterministic
  synthetic corpus used when no data file is given (nothing is downloaded).
* :class:`ResumableSampler` -- a :class:`~torch.utils.data.distributed.DistributedSampler`
  that can start an epoch at a given batch, for exact resume.

Resuming "at the next batch"
----------------------------
Build the loader as ``DataLoader(ds, batch_size=B, sampler=sampler)`` with
``sampler = ResumableSampler(ds, num_replicas=world, rank=rank, seed=S)`` (on
one process, leave ``num_replicas``/``rank`` out).  The loop counts
``batches_done`` -- micro-batches taken from the loader since the run began,
the same on every rank -- and saves it (with ``S`` and ``B``) in the
checkpoint.  On resume::

    per_epoch = sampler.batches_per_epoch(B)   # before any set_start
    epoch, start = resume_point(batches_done, per_epoch)
    for ep in range(epoch, epochs):
        sampler.set_epoch(ep)                   # clears any skip
        if ep == epoch:
            sampler.set_start(start, B)         # skip the batches already seen
        for batch in loader:                    # len(loader) shrinks accordingly
            ...

Pass ``drop_last=True`` to ``batches_per_epoch`` if the loader drops its last
partial batch.  The batches then seen
are exactly the tail of the epoch the interrupted run would have seen, because
the order depends only on ``(seed, epoch, rank, num_replicas)`` and the skip
is a whole number of batches.
"""
from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeAlias, Union

import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "read_jsonl_texts",
    "write_jsonl",
    "PretrainDataset",
    "default_corpus",
    "default_dataset",
    "ResumableSampler",
    "resume_point",
]

#: Label value ignored by the model's loss (same as ``model.IGNORE_INDEX``).
IGNORE_INDEX = -100

PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------
# Tokenizers


class ByteTokenizer:
    """Byte-level tokenizer: UTF-8 bytes are ids 0..255; pad=256, bos=257, eos=258.

    Lossless for any text.  ``decode`` drops special ids and replaces invalid
    UTF-8 (e.g. a sequence cut in the middle of a character) with U+FFFD.
    """

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``'s UTF-8 bytes (no specials added)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the byte ids in ``ids``; special ids are skipped."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` behind the :class:`ByteTokenizer` interface.

    Special ids are looked up by token text: the first of each candidate list
    that the vocabulary has.  The defaults fit minimind's tokenizer
    (``<|endoftext|>`` pads, ``<|im_start|>``/``<|im_end|>`` open/close) and
    common alternatives.
    """

    PAD_TOKENS = ("<|endoftext|>", "<pad>", "[PAD]", "</s>")
    BOS_TOKENS = ("<|im_start|>", "<s>", "<bos>", "[CLS]", "<|endoftext|>")
    EOS_TOKENS = ("<|im_end|>", "</s>", "<eos>", "[SEP]", "<|endoftext|>")

    def __init__(self, tokenizer, source: str = "<tokenizer>") -> None:
        self._tok = tokenizer
        self.source = source
        self.vocab_size = int(tokenizer.get_vocab_size())
        self.pad_id = self._find("pad", self.PAD_TOKENS)
        self.bos_id = self._find("bos", self.BOS_TOKENS)
        self.eos_id = self._find("eos", self.EOS_TOKENS)

    def _find(self, role: str, candidates: Sequence[str]) -> int:
        for token in candidates:
            idx = self._tok.token_to_id(token)
            if idx is not None:
                return int(idx)
        raise ValueError(
            f"{self.source}: tokenizer has no {role} token (looked for {', '.join(candidates)}); "
            "add one of them as a special token"
        )

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without added special tokens."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, special tokens skipped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source!r}, vocab_size={self.vocab_size})"


Tokenizer: TypeAlias = ByteTokenizer | HFTokenizer


def load_tokenizer(path: PathLike | None = None) -> Tokenizer:
    """``None`` -> :class:`ByteTokenizer`; a ``tokenizer.json`` (or a folder holding one) -> :class:`HFTokenizer`.

    Raises :class:`ImportError` telling to ``pip install tokenizers`` when the
    package is missing, :class:`FileNotFoundError` for a missing file and
    :class:`ValueError` for a file that cannot be parsed.
    """
    if path is None:
        return ByteTokenizer()
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"tokenizer file not found: {p} (give the path of a tokenizer.json, a folder holding one, "
            "or no tokenizer path for the built-in byte tokenizer)"
        )
    try:
        import tokenizers  # optional dependency, imported only when needed
    except ImportError as exc:
        raise ImportError(
            f"loading {p} needs the 'tokenizers' package: pip install tokenizers "
            "(or give no tokenizer path to use the built-in byte tokenizer)"
        ) from exc
    try:
        tok = tokenizers.Tokenizer.from_file(str(p))
    except Exception as exc:  # the Rust side raises its own exception types
        raise ValueError(f"{p}: not a valid tokenizer.json: {exc}") from exc
    return HFTokenizer(tok, source=str(p))


# ---------------------------------------------------------------------------
# JSONL files


def read_jsonl_texts(path: PathLike, field: str = "text") -> list[str]:
    """The ``field`` strings of a JSONL file, one JSON object per line.

    Blank lines are skipped.  Anything else that is not an object with a
    string ``field`` raises :class:`ValueError` of the form
    ``"<path>:<line>: <what is wrong>"``.  A missing file raises
    :class:`FileNotFoundError` naming it.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p} (expected JSONL with one {{\"{field}\": ...}} per line)")
    texts: list[str] = []
    with open(p, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{p}:{lineno}: line is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{p}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}); "
                    f"each line must be an object like {{\"{field}\": \"...\"}}"
                ) from None
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{p}:{lineno}: expected a JSON object like {{\"{field}\": \"...\"}}, "
                    f"got {type(obj).__name__}"
                )
            if field not in obj:
                keys = ", ".join(sorted(map(str, obj))) or "none"
                raise ValueError(f"{p}:{lineno}: object has no \"{field}\" key (keys: {keys})")
            value = obj[field]
            if not isinstance(value, str):
                raise ValueError(
                    f"{p}:{lineno}: \"{field}\" must be a string, got {type(value).__name__}"
                )
            texts.append(value)
    return texts


def write_jsonl(path: PathLike, texts: Iterable[str], field: str = "text") -> int:
    """Write ``texts`` to ``path`` as JSONL (UTF-8, one ``{field: text}`` per line); returns the count."""
    n = 0
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8", newline="\n") as fh:
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"write_jsonl: item {n} is {type(text).__name__}, not str")
            fh.write(json.dumps({field: text}, ensure_ascii=False))
            fh.write("\n")
            n += 1
    return n


# ---------------------------------------------------------------------------
# Dataset


class PretrainDataset(Dataset):
    """Fixed-length next-token-prediction examples.

    ``source`` is a JSONL path (see :func:`read_jsonl_texts`) or an iterable
    of strings.  Item ``i`` is ``(input_ids, labels)``, two int64 tensors of
    length ``max_seq_len``: ``[bos] + encode(text) + [eos]`` cut to
    ``max_seq_len`` (so a long document loses its tail and its eos), then
    padded with ``pad_id``.  ``labels`` equals ``input_ids`` except at padding
    positions, which are ``-100``.  The model shifts labels itself.
    Texts are tokenized on access, so building the dataset is cheap.
    """

    def __init__(self, source: PathLike | Iterable[str], tokenizer: Tokenizer, max_seq_len: int) -> None:
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
        if isinstance(source, (str, os.PathLike)):
            self.source = str(source)
            self.texts = read_jsonl_texts(source)
        else:
            self.source = "<texts>"
            self.texts = list(source)
            for i, t in enumerate(self.texts):
                if not isinstance(t, str):
                    raise TypeError(f"PretrainDataset: text {i} is {type(t).__name__}, not str")
        if not self.texts:
            raise ValueError(f"{self.source}: no documents (the dataset is empty)")
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer
        ids = [tok.bos_id] + tok.encode(self.texts[idx]) + [tok.eos_id]
        ids = ids[: self.max_seq_len]
        n = len(ids)
        input_ids = torch.full((self.max_seq_len,), tok.pad_id, dtype=torch.long)
        input_ids[:n] = torch.tensor(ids, dtype=torch.long)
        labels = torch.full((self.max_seq_len,), IGNORE_INDEX, dtype=torch.long)
        labels[:n] = input_ids[:n]
        return input_ids, labels


# ---------------------------------------------------------------------------
# Default corpus

_NAMES = ["tom", "ana", "li", "sam", "mia", "ben", "eva", "max"]
_ANIMALS = ["cat", "dog", "fox", "owl", "bird", "fish", "frog", "bear"]
_COLORS = ["red", "blue", "green", "brown", "white", "black"]
_PLACES = ["the river", "the park", "the hill", "the house", "the forest", "the lake"]
_VERBS = ["runs to", "walks to", "looks at", "sleeps near", "jumps over", "sits by"]
_THINGS = ["apple", "book", "ball", "cup", "stone", "coin"]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


def _doc_animal(rng: random.Random) -> str:
    color, animal, verb, place = rng.choice(_COLORS), rng.choice(_ANIMALS), rng.choice(_VERBS), rng.choice(_PLACES)
    return f"the {color} {animal} {verb} {place}. the {animal} is {color}. the {animal} likes {place}."


def _doc_sum(rng: random.Random) -> str:
    parts = []
    for _ in range(3):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        parts.append(f"{a} plus {b} is {a + b}.")
    return " ".join(parts)


def _doc_count(rng: random.Random) -> str:
    start = rng.randint(0, 5)
    n = rng.randint(3, 5)
    words = _NUMBER_WORDS[start : start + n]
    return "count: " + ", ".join(words) + ". " + " ".join(str(start + i) for i in range(n)) + "."


def _doc_story(rng: random.Random) -> str:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(1, 5), rng.randint(1, 4)
    return f"{name} has {a} {thing}s. {name} gets {b} more. now {name} has {a + b} {thing}s."


def _doc_days(rng: random.Random) -> str:
    i = rng.randrange(len(_DAYS))
    return f"after {_DAYS[i]} comes {_DAYS[(i + 1) % 7]}. before {_DAYS[i]} comes {_DAYS[(i - 1) % 7]}."


_TEMPLATES = (_doc_animal, _doc_sum, _doc_count, _doc_story, _doc_days)


def default_corpus(n_docs: int = 2000, seed: int = 0) -> list[str]:
    """``n_docs`` short synthetic English-like documents, a pure function of ``(n_docs, seed)``.

    Documents are drawn from a few templates (animal sentences, single-digit
    sums, counting, little arithmetic stories, weekday order) over small word
    lists; each is under 100 bytes, so it fits a 128-token byte-level window
    with bos/eos.  The structure is simple enough that a tiny model's loss
    falls visibly within a few hundred steps.  Uses its own
    :class:`random.Random`, never the global RNG.
    """
    if isinstance(n_docs, bool) or not isinstance(n_docs, int) or n_docs < 1:
        raise ValueError(f"n_docs must be a positive integer, got {n_docs!r}")
    rng = random.Random(seed)
    return [rng.choice(_TEMPLATES)(rng) for _ in range(n_docs)]


def default_dataset(
    tokenizer: Tokenizer | None = None, max_seq_len: int = 128, n_docs: int = 2000, seed: int = 0
) -> PretrainDataset:
    """A :class:`PretrainDataset` over :func:`default_corpus` (byte tokenizer if ``tokenizer`` is None)."""
    return PretrainDataset(default_corpus(n_docs, seed), tokenizer or ByteTokenizer(), max_seq_len)


# ---------------------------------------------------------------------------
# Resumable sampler


class ResumableSampler(DistributedSampler):
    """A :class:`DistributedSampler` whose epoch can start at a given batch.

    The index order of an epoch is exactly ``DistributedSampler``'s: a
    permutation drawn from ``seed + epoch`` (or ``range(len)`` when
    ``shuffle=False``), padded or cut to a multiple of ``num_replicas``, of
    which rank ``r`` takes every ``num_replicas``-th index starting at ``r``.
    It is a deterministic function of ``(seed, epoch, rank, num_replicas)``.

    ``num_replicas``/``rank`` default to the initialised process group's world
    size and rank, or to ``1``/``0`` when ``torch.distributed`` is not
    initialised (single process), so the sampler also works without DDP.

    :meth:`set_start` makes the current epoch skip its first ``batch_index``
    batches of ``batch_size`` indices, without loading any data;
    :meth:`set_epoch` clears the skip, so call ``set_epoch`` first, then
    ``set_start``.  ``len(sampler)`` is the number of indices still to come.
    See the module docstring for the full resume recipe.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start_index = 0

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch``'s order and clear any skip set by :meth:`set_start`."""
        super().set_epoch(epoch)
        self.start_index = 0

    def batches_per_epoch(self, batch_size: int, drop_last: bool = False) -> int:
        """Batches a ``DataLoader(batch_size, drop_last)`` yields over a whole epoch on this rank."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return self.num_samples // batch_size if drop_last else math.ceil(self.num_samples / batch_size)

    def set_start(self, batch_index: int, batch_size: int) -> None:
        """Start the current epoch at batch ``batch_index`` (0-based) of size ``batch_size``.

        ``batch_index`` may equal the number of batches in the epoch (nothing
        left); larger values raise :class:`ValueError`.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_index < 0:
            raise ValueError(f"batch_index must be >= 0, got {batch_index}")
        limit = math.ceil(self.num_samples / batch_size)
        if batch_index > limit:
            raise ValueError(
                f"batch_index {batch_index} is past the end of the epoch "
                f"({limit} batches of {batch_size} on this rank)"
            )
        self.start_index = min(batch_index * batch_size, self.num_samples)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_index :])

    def __len__(self) -> int:
        return self.num_samples - self.start_index

    def state_dict(self) -> dict:
        """``{"epoch", "seed", "start_index", "num_replicas", "rank", "shuffle", "drop_last"}``, JSON-serialisable."""
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "start_index": self.start_index,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore epoch, seed and skip from :meth:`state_dict` (the replica layout must match)."""
        for key in ("num_replicas", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r}, this sampler has {getattr(self, key)!r}"
                )
        self.seed = int(state["seed"])
        super().set_epoch(int(state["epoch"]))
        start = int(state.get("start_index", 0))
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"sampler state start_index {start} outside 0..{self.num_samples}")
        self.start_index = start


def resume_point(batches_done: int, batches_per_epoch: int) -> tuple[int, int]:
    """``(epoch, batch_index)`` at which to continue after ``batches_done`` batches in total.

    ``batches_done`` counts loader batches from the start of training (the same
    on every DDP rank); ``batches_per_epoch`` is the full-epoch loader length
    (:meth:`ResumableSampler.batches_per_epoch`).
    """
    if batches_per_epoch < 1:
        raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
    if batches_done < 0:
        raise ValueError(f"batches_done must be >= 0, got {batches_done}")
    return divmod(batches_done, batches_per_epoch)
