"""A small decoder-only language model in the minimind style.

The architecture is the usual modern small-LM recipe:

* token embedding whose weight is shared with the output head (tied weights);
* ``num_hidden_layers`` pre-norm blocks, each ``x + attn(norm(x))`` then
  ``x + mlp(norm(x))``, with :class:`RMSNorm`;
* grouped-query attention (:class:`Attention`): ``num_key_value_heads`` key and
  value heads shared by ``num_attention_heads`` query heads, rotary position
  embeddings applied to queries and keys, and
  :func:`torch.nn.functional.scaled_dot_product_attention` with a causal mask;
* a SwiGLU feed-forward block (:class:`SwiGLU`).

Typical use::

    from saverules.minimind.model import MiniMindLM, config_for

    cfg = config_for("tiny")                     # or config_for("small", vocab_size=...)
    torch.manual_seed(0)
    model = MiniMindLM(cfg)
    logits, loss = model(input_ids, labels)      # loss is None when labels is None

``labels`` has the same shape as ``input_ids``; the model shifts internally
(position ``t`` predicts label ``t + 1``), and label ``-100`` (:data:`IGNORE_INDEX`)
marks positions that do not count, e.g. padding.

Checkpoints: ``dataclasses.asdict(cfg)`` (or :meth:`ModelConfig.to_dict`) is a
plain JSON-able dict and :meth:`ModelConfig.from_dict` rebuilds the config;
``model.state_dict()`` holds only parameters (the rotary tables are
non-persistent buffers, rebuilt from the config).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IGNORE_INDEX",
    "ModelConfig",
    "PRESETS",
    "config_for",
    "RMSNorm",
    "rope_tables",
    "apply_rope",
    "repeat_kv",
    "Attention",
    "SwiGLU",
    "Block",
    "MiniMindLM",
]

#: Label value that the loss ignores (padding, prompt tokens, ...).
IGNORE_INDEX = -100


def _derived_intermediate_size(hidden_size: int) -> int:
    """SwiGLU width: 8/3 of the hidden size, rounded up to a multiple of 64."""
    raw = int(hidden_size * 8 / 3)
    return 64 * ((raw + 63) // 64)


@dataclass
class ModelConfig:
    """Shape of a :class:`MiniMindLM`.

    ``intermediate_size`` left as ``None`` becomes ``8/3 * hidden_size``
    rounded up to a multiple of 64 (the usual SwiGLU width).  All sizes must be
    positive; ``hidden_size`` must split evenly into ``num_attention_heads``
    heads of even width (rotary embeddings rotate pairs of channels), and
    ``num_attention_heads`` must be a multiple of ``num_key_value_heads``.
    Invalid values raise :class:`ValueError` naming the field.
    """

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_seq_len: int
    intermediate_size: int | None = None
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "max_seq_len",
        ):
            _check_positive_int(name, getattr(self, name))
        if self.intermediate_size is None:
            self.intermediate_size = _derived_intermediate_size(self.hidden_size)
        else:
            _check_positive_int("intermediate_size", self.intermediate_size)
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"ModelConfig: hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"ModelConfig: num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"ModelConfig: head width hidden_size/num_attention_heads = {self.head_dim} "
                "must be even for rotary position embeddings"
            )
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"ModelConfig: rope_theta must be a positive number, got {self.rope_theta!r}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(
                f"ModelConfig: rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}"
            )
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"ModelConfig: dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        """A plain dict of all fields (JSON-serialisable), for checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown keys are a ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"ModelConfig: unknown field(s) {unknown}; valid fields are {sorted(names)}"
            )
        return cls(**dict(data))


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig: {name} must be a positive integer, got {value!r}")


#: Named model sizes.  ``tiny`` trains visibly on a laptop CPU in a minute
#: (its vocabulary is the byte tokenizer's: 256 bytes + pad/bos/eos); ``small``
#: is the ~26M-parameter minimind size (vocabulary 6400).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=259,
        max_seq_len=128,
    ),
    "small": ModelConfig(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=6400,
        max_seq_len=512,
    ),
}


def config_for(preset: str, **overrides: Any) -> ModelConfig:
    """The config of preset ``preset`` with ``overrides`` applied.

    Overrides whose value is ``None`` are ignored, so command-line options that
    were not given can be passed straight through.  When ``hidden_size`` is
    overridden and the preset's ``intermediate_size`` was the derived default,
    the width is derived again for the new hidden size (unless
    ``intermediate_size`` is overridden too).  Unknown presets or fields raise
    :class:`ValueError` listing the valid ones.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; valid presets: {', '.join(sorted(PRESETS))}")
    base = PRESETS[preset]
    given = {k: v for k, v in overrides.items() if v is not None}
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid fields: {sorted(names)}")
    fields = base.to_dict()
    if (
        "hidden_size" in given
        and "intermediate_size" not in given
        and base.intermediate_size == _derived_intermediate_size(base.hidden_size)
    ):
        fields["intermediate_size"] = None
    fields.update(given)
    return ModelConfig(**fields)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned per-channel gain (no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def rope_tables(head_dim: int, max_seq_len: int, theta: float = 1e6) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos/sin tables of shape ``(max_seq_len, head_dim)``.

    Channel ``i`` and channel ``i + head_dim/2`` form a rotating pair with
    frequency ``theta ** (-2i / head_dim)``; row ``p`` holds the angles for
    position ``p``.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, dtype=torch.float64) * 2.0 / head_dim))
    pos = torch.arange(max_seq_len, dtype=torch.float64)
    angles = torch.outer(pos, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(..., T, head_dim)`` by the angles in ``cos``/``sin`` ``(T, head_dim)``."""
    return (x * cos + _rotate_half(x) * sin).to(x.dtype)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(B, kv_heads, T, D)`` -> ``(B, kv_heads * n_rep, T, D)``; query head ``h`` uses kv head ``h // n_rep``."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary position embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def project_qk(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries ``(B, H, T, D)``, rotated keys and values ``(B, KV, T, D)``."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project_qk(x, cos, sin)
        k = repeat_kv(k, self.n_rep)
        v = repeat_kv(v, self.n_rep)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.resid_dropout(self.o_proj(out))


class SwiGLU(nn.Module):
    """Gated feed-forward block: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.intermediate_size is not None
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    """One pre-norm transformer block (attention, then SwiGLU, each residual)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin)
        return x + self.mlp(self.post_attn_norm(x))


class MiniMindLM(nn.Module):
    """Decoder-only causal language model (see the module docstring).

    ``forward(input_ids, labels=None)`` returns ``(logits, loss)``: ``logits``
    is ``(B, T, vocab_size)`` and ``loss`` is the mean next-token cross
    entropy over label positions other than ``-100`` (``None`` without
    labels).  Initialisation is deterministic given ``torch.manual_seed``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied input/output embeddings
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights; residual output projections scaled by 1/sqrt(2 * layers); norms at 1."""
        std = 0.02
        resid_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=std)
        for layer in cast("list[Block]", self.layers):
            for lin in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj):
                nn.init.normal_(lin.weight, mean=0.0, std=std)
            for lin in (layer.attn.o_proj, layer.mlp.down_proj):
                nn.init.normal_(lin.weight, mean=0.0, std=resid_std)
            nn.init.ones_(layer.input_norm.weight)
            nn.init.ones_(layer.post_attn_norm.weight)
        nn.init.ones_(self.norm.weight)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of distinct parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        position_offset: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for ``input_ids`` ``(B, T)`` and, given ``labels`` ``(B, T)``, the shifted loss.

        ``position_offset`` places the sequence at positions
        ``offset .. offset + T - 1`` of the rotary tables (the output does not
        depend on it, up to rounding, since attention sees only relative
        positions); ``offset + T`` must not exceed ``max_seq_len``.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        if position_offset < 0 or position_offset + t > self.config.max_seq_len:
            raise ValueError(
                f"sequence positions {position_offset}..{position_offset + t - 1} exceed "
                f"max_seq_len={self.config.max_seq_len}"
            )
        rope_cos, rope_sin = cast(torch.Tensor, self.rope_cos), cast(torch.Tensor, self.rope_sin)  # buffers
        cos = rope_cos[position_offset : position_offset + t]
        sin = rope_sin[position_offset : position_offset + t]
        x = self.dropout(self.embed_tokens(input_ids))
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels shape {tuple(labels.shape)} must match input_ids shape {tuple(input_ids.shape)}"
                )
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend ``input_ids`` ``(B, T)`` by up to ``max_new_tokens`` sampled tokens.

        ``temperature == 0`` is greedy.  The context is cropped to the last
        ``max_seq_len`` tokens.  Stops early once every row has produced
        ``eos_id`` (if given).  No KV cache: meant for short samples.
        """
        out = input_ids
        done = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
        for _ in range(max_new_tokens):
            logits, _ = self(out[:, -self.config.max_seq_len :])
            last = logits[:, -1, :].float()
            if temperature == 0:
                nxt = last.argmax(dim=-1, keepdim=True)
            else:
                last = last / temperature
                if top_k is not None and top_k < last.shape[-1]:
                    kth = torch.topk(last, top_k, dim=-1).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                probs = torch.softmax(last, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            out = torch.cat([out, nxt], dim=1)
            if eos_id is not None:
                done |= nxt.squeeze(1) == eos_id
                if bool(done.all()):
                    break
        return out
