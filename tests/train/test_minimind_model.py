"""Tests for the minimind-style reference model (saverules.minimind.model)."""
import math

import pytest
import torch
from torch.utils.data import DataLoader

from saverules.minimind.data import ByteTokenizer, default_dataset
from saverules.minimind.model import (
    IGNORE_INDEX,
    PRESETS,
    Attention,
    MiniMindLM,
    ModelConfig,
    apply_rope,
    config_for,
    repeat_kv,
    rope_tables,
)


def tiny_cfg(**kw):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=50, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


# --- config ------------------------------------------------------------------------------------


def test_intermediate_size_derived_as_multiple_of_64():
    cfg = tiny_cfg(hidden_size=512, num_attention_heads=8)
    # 8/3 * 512 = 1365.33 -> 1365 -> rounded up to a multiple of 64
    assert cfg.intermediate_size == 1408
    assert tiny_cfg(intermediate_size=100).intermediate_size == 100
    assert tiny_cfg(hidden_size=64).intermediate_size == 192


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(hidden_size=30), "divisible by num_attention_heads"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads"),
        (dict(hidden_size=0), "hidden_size must be a positive integer"),
        (dict(num_hidden_layers=-1), "num_hidden_layers must be a positive integer"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(max_seq_len=2.5), "max_seq_len"),
        (dict(intermediate_size=0), "intermediate_size"),
        (dict(hidden_size=12, num_attention_heads=4, num_key_value_heads=1), "must be even"),
        (dict(dropout=1.0), "dropout"),
        (dict(rope_theta=0), "rope_theta"),
        (dict(rms_norm_eps=-1e-5), "rms_norm_eps"),
    ],
)
def test_config_validation_errors(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        tiny_cfg(**kw)


def test_config_for_presets_and_overrides():
    tiny = config_for("tiny")
    assert tiny == PRESETS["tiny"] and tiny is not PRESETS["tiny"]
    assert tiny.vocab_size == ByteTokenizer().vocab_size
    assert tiny.num_key_value_heads < tiny.num_attention_heads
    # None overrides are ignored
    assert config_for("tiny", hidden_size=None, dropout=None) == PRESETS["tiny"]
    small = config_for("small", vocab_size=259, max_seq_len=None)
    assert small.vocab_size == 259 and small.max_seq_len == 512 and small.hidden_size == 512
    # changing hidden_size re-derives the SwiGLU width unless given explicitly
    assert config_for("tiny", hidden_size=128).intermediate_size == 384
    assert config_for("tiny", hidden_size=128, intermediate_size=256).intermediate_size == 256
    # the presets themselves are not modified
    assert PRESETS["tiny"].hidden_size == 64


def test_config_for_errors():
    with pytest.raises(ValueError) as exc:
        config_for("huge")
    assert "small" in str(exc.value) and "tiny" in str(exc.value) and "huge" in str(exc.value)
    with pytest.raises(ValueError, match="hiden_size"):
        config_for("tiny", hiden_size=3)
    with pytest.raises(ValueError, match="divisible"):
        config_for("tiny", hidden_size=66)


def test_config_dict_round_trip():
    cfg = config_for("small")
    d = cfg.to_dict()
    assert ModelConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**d, "bogus": 1})


# --- model -------------------------------------------------------------------------------------


def test_forward_shapes_and_no_loss_without_labels():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = MiniMindLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 11))
    logits, loss = model(ids)
    assert logits.shape == (3, 11, cfg.vocab_size)
    assert loss is None
    _, loss = model(ids, ids)
    assert loss.dim() == 0 and torch.isfinite(loss)
    # an untrained model with small init is close to uniform
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.5


def test_forward_rejects_bad_shapes():
    model = MiniMindLM(tiny_cfg(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="labels shape"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))


def test_loss_ignores_minus_100_and_matches_manual_shifted_ce():
    torch.manual_seed(1)
    cfg = tiny_cfg()
    model = MiniMindLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    labels = ids.clone()
    labels[0, 7:] = IGNORE_INDEX
    labels[1, 3] = IGNORE_INDEX
    logits, loss = model(ids, labels)

    logp = torch.log_softmax(logits.double(), dim=-1)
    terms = []
    for b in range(2):
        for t in range(9):  # position t predicts label t+1
            target = int(labels[b, t + 1])
            if target != IGNORE_INDEX:
                terms.append(-logp[b, t, target])
    manual = torch.stack(terms).mean()
    assert len(terms) == 2 * 9 - 3 - 1
    assert torch.allclose(loss.double(), manual, atol=1e-5)

    # the first label is never a target (shifted away), so changing it changes nothing
    other = labels.clone()
    other[:, 0] = (other[:, 0] + 1) % cfg.vocab_size
    _, loss_again = model(ids, other)
    assert torch.equal(loss, loss_again)
    # while un-ignoring a position does change the loss
    other[0, 7] = ids[0, 7]
    _, loss_more = model(ids, other)
    assert not torch.allclose(loss, loss_more)


def test_tied_embeddings_really_tied():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = MiniMindLM(cfg)
    assert model.lm_head.weight is model.embed_tokens.weight
    distinct = {id(p) for p in model.parameters()}
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert len(distinct) == len(list(model.parameters()))
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model.embed_tokens.weight.detach().clone()
    _, loss = model(ids, ids)
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.embed_tokens.weight)
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    # a state dict saved and loaded keeps the tie
    fresh = MiniMindLM(cfg)
    fresh.load_state_dict(model.state_dict())
    assert fresh.lm_head.weight is fresh.embed_tokens.weight
    assert torch.equal(fresh.lm_head.weight, model.embed_tokens.weight)


def test_rope_tables_are_not_persistent():
    model = MiniMindLM(tiny_cfg())
    keys = set(model.state_dict())
    assert not any("rope" in k for k in keys)
    assert model.rope_cos.shape == (32, 8)


def test_repeat_kv_maps_query_head_to_kv_head():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    out = repeat_kv(x, 4)
    assert out.shape == (2, 12, 4, 5)
    for h in range(12):
        assert torch.equal(out[:, h], x[:, h // 4])
    assert repeat_kv(x, 1) is x


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_query_attention_matches_explicit_computation(kv_heads):
    torch.manual_seed(2)
    cfg = tiny_cfg(num_attention_heads=4, num_key_value_heads=kv_heads)
    attn = Attention(cfg).eval()
    assert attn.k_proj.out_features == kv_heads * cfg.head_dim
    cos, sin = rope_tables(cfg.head_dim, 16, cfg.rope_theta)
    x = torch.randn(2, 7, cfg.hidden_size)
    out = attn(x, cos[:7], sin[:7])

    q, k, v = attn.project_qk(x, cos[:7], sin[:7])
    rep = 4 // kv_heads
    heads = []
    mask = torch.ones(7, 7).tril().bool()
    for h in range(4):
        scores = q[:, h] @ k[:, h // rep].transpose(-1, -2) / math.sqrt(cfg.head_dim)
        scores = scores.masked_fill(~mask, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[:, h // rep])
    manual = attn.o_proj(torch.stack(heads, dim=1).transpose(1, 2).reshape(2, 7, -1))
    assert torch.allclose(out, manual, atol=1e-5)


def test_rope_scores_depend_only_on_relative_offset():
    torch.manual_seed(3)
    head_dim = 16
    cos, sin = rope_tables(head_dim, 64, theta=1e4)
    q = torch.randn(head_dim)
    k = torch.randn(head_dim)

    def score(pq, pk):
        rq = apply_rope(q.view(1, head_dim), cos[pq : pq + 1], sin[pq : pq + 1])
        rk = apply_rope(k.view(1, head_dim), cos[pk : pk + 1], sin[pk : pk + 1])
        return float((rq * rk).sum())

    for offset in (0, 1, 5):
        base = score(10 + offset, 10)
        for shift in (-10, -3, 7, 30):
            assert score(10 + offset + shift, 10 + shift) == pytest.approx(base, abs=1e-4)
    # but different offsets do give different scores
    assert score(12, 10) != pytest.approx(score(11, 10), abs=1e-3)
    # rotation preserves norms
    rq = apply_rope(q.view(1, head_dim), cos[33:34], sin[33:34])
    assert rq.norm().item() == pytest.approx(q.norm().item(), rel=1e-5)


def test_model_output_invariant_to_absolute_position_shift():
    torch.manual_seed(4)
    cfg = tiny_cfg(max_seq_len=32)
    model = MiniMindLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    a, _ = model(ids)
    b, _ = model(ids, position_offset=13)
    assert torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError):
        model(ids, position_offset=24)


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(5)
    cfg = tiny_cfg()
    model = MiniMindLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % cfg.vocab_size
    a, _ = model(ids)
    b, _ = model(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_deterministic_init():
    cfg = tiny_cfg()
    torch.manual_seed(123)
    a = MiniMindLM(cfg).state_dict()
    torch.manual_seed(123)
    b = MiniMindLM(cfg).state_dict()
    torch.manual_seed(124)
    c = MiniMindLM(cfg).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed_tokens.weight"], c["embed_tokens.weight"])


def test_small_preset_is_about_26m_parameters():
    cfg = config_for("small")
    model = MiniMindLM(cfg)
    n = model.num_parameters()
    assert 25_000_000 <= n <= 27_000_000
    # cross-check against the closed-form count of the architecture
    h, i, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    assert n == v * h + layers * per_layer + h


def test_generate_extends_sequence():
    torch.manual_seed(6)
    cfg = tiny_cfg(max_seq_len=8)
    model = MiniMindLM(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    out = model.generate(prompt, 6, temperature=0)
    assert out.shape == (2, 11)
    assert torch.equal(out[:, :5], prompt)
    again = model.generate(prompt, 6, temperature=0)
    assert torch.equal(out, again)
    g = torch.Generator().manual_seed(0)
    sampled = model.generate(prompt, 3, temperature=1.0, top_k=5, generator=g)
    assert sampled.shape == (2, 8) and int(sampled.max()) < cfg.vocab_size


def test_tiny_preset_loss_falls_on_default_corpus():
    # one intra-op thread: the model is tiny, and extra threads only spin when the CI cores are busy
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_tiny_for_30_steps()
    finally:
        torch.set_num_threads(threads)


def _train_tiny_for_30_steps():
    torch.manual_seed(0)
    cfg = config_for("tiny")
    model = MiniMindLM(cfg)
    ds = default_dataset(max_seq_len=cfg.max_seq_len, n_docs=512)
    loader = DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    step = 0
    while step < 30:
        for x, y in loader:
            _, loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if step == 30:
                break
    first = losses[0]
    last = sum(losses[-5:]) / 5
    assert first == pytest.approx(math.log(cfg.vocab_size), abs=0.5)
    assert last < 0.7 * first, losses
