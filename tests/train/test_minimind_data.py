"""Tests for saverules.minimind.data: tokenizers, JSONL data, default corpus, resumable sampler."""
import json
import sys
import types

import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from saverules.minimind.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    HFTokenizer,
    PretrainDataset,
    ResumableSampler,
    default_corpus,
    default_dataset,
    load_tokenizer,
    read_jsonl_texts,
    resume_point,
    write_jsonl,
)

# --- tokenizers ----------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_including_non_ascii():
    tok = ByteTokenizer()
    for text in ["", "hello world", "héllo, wörld", "日本語のテキスト", "emoji 🙂🚀 mix\nnew\tline"]:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.encode("é") == [0xC3, 0xA9]


def test_byte_tokenizer_specials():
    tok = ByteTokenizer()
    specials = {tok.pad_id, tok.bos_id, tok.eos_id}
    assert len(specials) == 3
    assert all(256 <= s < tok.vocab_size for s in specials)
    assert tok.vocab_size == 259
    assert tok.decode([tok.bos_id] + tok.encode("ok") + [tok.eos_id, tok.pad_id]) == "ok"
    # a cut multi-byte character decodes to the replacement character, not an exception
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"


def test_load_tokenizer_none_is_byte_tokenizer():
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer(), ByteTokenizer)


def test_load_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)  # a folder without tokenizer.json


def test_load_tokenizer_without_tokenizers_package_says_pip_install(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError) as exc:
        load_tokenizer(path)
    assert "pip install tokenizers" in str(exc.value)
    assert str(path) in str(exc.value)


class _FakeEncoding:
    def __init__(self, ids):
        self.ids = ids


class _FakeHFTokenizer:
    """Stands in for tokenizers.Tokenizer: words are tokens, three specials at 0..2."""

    def __init__(self, specials):
        self.vocab = dict(specials)
        for w in ["hello", "world", "again"]:
            self.vocab[w] = len(self.vocab)
        self.inverse = {v: k for k, v in self.vocab.items()}
        self.specials = set(specials)

    def get_vocab_size(self):
        return len(self.vocab)

    def token_to_id(self, token):
        return self.vocab.get(token)

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return _FakeEncoding([self.vocab[w] for w in text.split()])

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(self.inverse[i] for i in ids if not (skip_special_tokens and self.inverse[i] in self.specials))


def _install_fake_tokenizers(monkeypatch, factory):
    module = types.ModuleType("tokenizers")
    seen = []

    class Tokenizer:
        @staticmethod
        def from_file(path):
            seen.append(path)
            return factory()

    module.Tokenizer = Tokenizer
    monkeypatch.setitem(sys.modules, "tokenizers", module)
    return seen


def test_load_tokenizer_wraps_tokenizer_json(tmp_path, monkeypatch):
    specials = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    seen = _install_fake_tokenizers(monkeypatch, lambda: _FakeHFTokenizer(specials))
    (tmp_path / "tokenizer.json").write_text("{}")
    tok = load_tokenizer(tmp_path)  # a folder holding tokenizer.json
    assert seen == [str(tmp_path / "tokenizer.json")]
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 6
    ids = tok.encode("hello world")
    assert ids == [3, 4]
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == "hello world"
    # and it drives a dataset like the byte tokenizer
    ds = PretrainDataset(["hello again"], tok, max_seq_len=6)
    x, y = ds[0]
    assert x.tolist() == [1, 3, 5, 2, 0, 0]
    assert y.tolist() == [1, 3, 5, 2, IGNORE_INDEX, IGNORE_INDEX]


def test_load_tokenizer_errors_from_tokenizer_file(tmp_path, monkeypatch):
    path = tmp_path / "tok.json"
    path.write_text("not json")

    def broken():
        raise RuntimeError("expected value at line 1")

    _install_fake_tokenizers(monkeypatch, broken)
    with pytest.raises(ValueError, match="tok.json: not a valid tokenizer.json"):
        load_tokenizer(path)

    _install_fake_tokenizers(monkeypatch, lambda: _FakeHFTokenizer({"<pad>": 0, "<s>": 1}))
    with pytest.raises(ValueError) as exc:
        load_tokenizer(path)
    assert "no eos token" in str(exc.value) and "tok.json" in str(exc.value)


# --- JSONL and dataset ---------------------------------------------------------------------------


def test_dataset_padding_and_labels():
    tok = ByteTokenizer()
    ds = PretrainDataset(["ab", "abcdefgh"], tok, max_seq_len=6)
    assert len(ds) == 2
    x, y = ds[0]
    assert x.dtype == torch.long and y.dtype == torch.long
    assert x.shape == (6,) and y.shape == (6,)
    assert x.tolist() == [tok.bos_id, 97, 98, tok.eos_id, tok.pad_id, tok.pad_id]
    assert y.tolist() == [tok.bos_id, 97, 98, tok.eos_id, IGNORE_INDEX, IGNORE_INDEX]
    # too long: truncated, no padding, nothing ignored
    x, y = ds[1]
    assert x.tolist() == [tok.bos_id, 97, 98, 99, 100, 101]
    assert torch.equal(x, y)


def test_dataset_exact_fit_has_eos_and_no_padding():
    tok = ByteTokenizer()
    x, y = PretrainDataset(["abcd"], tok, max_seq_len=6)[0]
    assert x.tolist() == [tok.bos_id, 97, 98, 99, 100, tok.eos_id]
    assert torch.equal(x, y)


def test_dataset_from_jsonl_round_trip(tmp_path):
    texts = ["first doc", "zweites Dokument: größer", "第三", "quote \" and \\ backslash"]
    path = tmp_path / "sub" / "data.jsonl"
    assert write_jsonl(path, texts) == 4
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[2]) == {"text": "第三"}
    assert "第三" in lines[2]  # written as UTF-8, not \u escapes
    assert read_jsonl_texts(path) == texts
    ds = PretrainDataset(path, ByteTokenizer(), max_seq_len=64)
    assert ds.texts == texts
    x, y = ds[1]
    n = len(texts[1].encode("utf-8")) + 2
    assert ByteTokenizer().decode(x[:n].tolist()) == texts[1]
    assert (y[n:] == IGNORE_INDEX).all() and (y[:n] == x[:n]).all()


def test_jsonl_blank_lines_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b", "meta": 1}\n', encoding="utf-8")
    assert read_jsonl_texts(path) == ["a", "b"]


@pytest.mark.parametrize(
    "bad_line, fragment",
    [
        ('{"text": "unterminated}', "invalid JSON"),
        ('["text", "x"]', "expected a JSON object"),
        ('{"body": "x"}', 'no "text" key (keys: body)'),
        ('{"text": 42}', '"text" must be a string'),
        ("not json at all", "invalid JSON"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, bad_line, fragment):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n' + bad_line + '\n{"text": "after"}\n', encoding="utf-8")
    with pytest.raises(ValueError) as exc:
        PretrainDataset(path, ByteTokenizer(), max_seq_len=16)
    msg = str(exc.value)
    assert msg.startswith(f"{path}:3: ")
    assert fragment in msg


def test_jsonl_invalid_utf8_and_missing_or_empty_file(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(ValueError, match=r"bytes\.jsonl:2: line is not valid UTF-8"):
        read_jsonl_texts(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        PretrainDataset(tmp_path / "missing.jsonl", ByteTokenizer(), 16)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no documents"):
        PretrainDataset(empty, ByteTokenizer(), 16)


def test_dataset_argument_errors():
    with pytest.raises(ValueError, match="max_seq_len"):
        PretrainDataset(["a"], ByteTokenizer(), 1)
    with pytest.raises(TypeError, match="text 1"):
        PretrainDataset(["a", 3], ByteTokenizer(), 8)


# --- default corpus ------------------------------------------------------------------------------


def test_default_corpus_deterministic():
    a = default_corpus(300, seed=0)
    b = default_corpus(300, seed=0)
    c = default_corpus(300, seed=1)
    assert a == b
    assert a != c
    assert len(a) == 300 and all(isinstance(t, str) and t for t in a)
    # a prefix property: more documents extend, never reshuffle, the same stream
    assert default_corpus(500, seed=0)[:300] == a
    # varied: several distinct templates and many distinct documents
    assert len(set(a)) > 100
    assert {t.split()[0] for t in a} >= {"count:", "after"}
    # fits a 128-token byte window with bos and eos
    assert max(len(t.encode("utf-8")) for t in a) <= 126


def test_default_corpus_does_not_touch_global_rng():
    import random

    random.seed(99)
    expected = random.random()
    random.seed(99)
    default_corpus(50, seed=3)
    assert random.random() == expected
    with pytest.raises(ValueError):
        default_corpus(0)


def test_default_dataset_items():
    ds = default_dataset(max_seq_len=128, n_docs=64)
    assert len(ds) == 64
    x, y = ds[0]
    tok = ByteTokenizer()
    assert x.shape == (128,) and x[0] == tok.bos_id
    n = int((y != IGNORE_INDEX).sum())
    assert x[n - 1] == tok.eos_id and (x[n:] == tok.pad_id).all()
    assert tok.decode(x.tolist()) == default_corpus(64)[0]


# --- resumable sampler ---------------------------------------------------------------------------


class _Range(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


@pytest.mark.parametrize("n, world, drop_last", [(37, 1, False), (37, 3, False), (37, 3, True), (40, 4, False)])
def test_sampler_order_matches_distributed_sampler(n, world, drop_last):
    ds = _Range(n)
    for rank in range(world):
        for epoch in (0, 1, 5):
            ours = ResumableSampler(ds, num_replicas=world, rank=rank, seed=7, drop_last=drop_last)
            ref = DistributedSampler(ds, num_replicas=world, rank=rank, seed=7, drop_last=drop_last)
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref)
            assert len(ours) == len(ref)


def test_sampler_defaults_to_single_process():
    s = ResumableSampler(_Range(10), seed=1)
    assert (s.num_replicas, s.rank) == (1, 0)
    assert sorted(s) == list(range(10))


def test_sampler_order_is_function_of_seed_and_epoch():
    ds = _Range(50)

    def order(seed, epoch):
        s = ResumableSampler(ds, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(3, 2)) == list(range(50))
    unshuffled = ResumableSampler(ds, shuffle=False)
    assert list(unshuffled) == list(range(50))


@pytest.mark.parametrize("world", [2, 3, 5])
def test_rank_partition_covers_all_indices(world):
    n = 23
    ds = _Range(n)
    parts = []
    for rank in range(world):
        s = ResumableSampler(ds, num_replicas=world, rank=rank, seed=4)
        s.set_epoch(2)
        parts.append(list(s))
    assert len({len(p) for p in parts}) == 1  # equal share per rank
    union = [i for p in parts for i in p]
    assert set(union) == set(range(n))
    assert len(union) - n == (-n) % world  # only the DistributedSampler padding repeats
    # an evenly divisible dataset is split into disjoint parts
    even = [list(ResumableSampler(_Range(24), num_replicas=4, rank=r, seed=4)) for r in range(4)]
    flat = [i for p in even for i in p]
    assert sorted(flat) == list(range(24))


@pytest.mark.parametrize("world, rank", [(1, 0), (3, 1)])
def test_skipping_k_batches_yields_tail_of_full_order(world, rank):
    ds = _Range(53)
    bs = 4
    full = ResumableSampler(ds, num_replicas=world, rank=rank, seed=11)
    full.set_epoch(3)
    full_order = list(full)
    full_batches = [b.tolist() for b in DataLoader(ds, batch_size=bs, sampler=full)]
    per_epoch = full.batches_per_epoch(bs)
    assert per_epoch == len(full_batches)
    for k in range(per_epoch + 1):
        s = ResumableSampler(ds, num_replicas=world, rank=rank, seed=11)
        s.set_epoch(3)
        s.set_start(k, bs)
        assert list(s) == full_order[k * bs :]
        assert len(s) == len(full_order[k * bs :])
        batches = [b.tolist() for b in DataLoader(ds, batch_size=bs, sampler=s)]
        assert batches == full_batches[k:]


def test_set_epoch_clears_skip_and_set_start_validates():
    s = ResumableSampler(_Range(10), seed=0)
    s.set_epoch(1)
    whole = list(s)
    s.set_start(2, 3)
    assert list(s) == whole[6:]
    s.set_epoch(1)
    assert list(s) == whole
    s.set_start(4, 3)  # 4 batches of 3 cover 10: nothing left
    assert list(s) == [] and len(s) == 0
    with pytest.raises(ValueError, match="past the end"):
        s.set_start(5, 3)
    with pytest.raises(ValueError):
        s.set_start(-1, 3)
    with pytest.raises(ValueError):
        s.set_start(0, 0)


def test_sampler_state_dict_round_trip():
    ds = _Range(30)
    s = ResumableSampler(ds, seed=5)
    s.set_epoch(4)
    s.set_start(3, 4)
    state = json.loads(json.dumps(s.state_dict()))
    t = ResumableSampler(ds, seed=0)
    t.load_state_dict(state)
    assert list(t) == list(s)
    other = ResumableSampler(ds, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="num_replicas"):
        other.load_state_dict(state)


def test_resume_point():
    assert resume_point(0, 5) == (0, 0)
    assert resume_point(7, 5) == (1, 2)
    assert resume_point(10, 5) == (2, 0)
    with pytest.raises(ValueError):
        resume_point(3, 0)
    with pytest.raises(ValueError):
        resume_point(-1, 5)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stop_after", [0, 3, 8, 9, 17])
def test_interrupted_run_resumes_at_next_batch(world, stop_after):
    """Following the module docstring's recipe reproduces the uninterrupted batch stream on every rank."""
    ds = _Range(35)
    bs, epochs, seed = 4, 3, 21

    for rank in range(world):
        def stream(start_batches=0):
            sampler = ResumableSampler(ds, num_replicas=world, rank=rank, seed=seed)
            loader = DataLoader(ds, batch_size=bs, sampler=sampler)
            per_epoch = sampler.batches_per_epoch(bs)
            epoch0, start = resume_point(start_batches, per_epoch)
            out = []
            for ep in range(epoch0, epochs):
                sampler.set_epoch(ep)
                if ep == epoch0:
                    sampler.set_start(start, bs)
                out.extend(b.tolist() for b in loader)
            return out

        full = stream()
        assert stream(stop_after) == full[stop_after:]
