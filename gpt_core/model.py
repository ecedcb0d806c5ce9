"""A GPT-2-style decoder-only transformer, written to be read.

One forward serves training (full sequences, fused causal attention) and cached decoding (a few
new tokens attending to a KV cache of earlier ones, with an explicit mask). The exported ONNX graph
is this same forward, so what is tested here is what ships.

References:
1) Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2).
2) karpathy/nanoGPT model.py, whose layout and parameter names (GPT-2's) this follows.

Shapes: B batch, T new tokens, P cached (past) tokens, S = P + T keys, C n_embd, nh heads,
hs head size.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt_core.config import GPTConfig
from runtime.errors import ConfigError, GenerationError

# One (key, value) pair per layer, each (B, nh, S, hs), as Hugging Face's GPT-2 returns it.
PastKeyValues = tuple[tuple[torch.Tensor, torch.Tensor], ...]


class GPTOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab_size)
    loss: torch.Tensor | None  # mean cross-entropy when targets are given
    past_key_values: PastKeyValues | None  # the cache after this step, when asked for


class AttentionKernel(Protocol):
    """How attention is computed from the packed q|k|v projection (B, T, 3C).

    Returns the heads' output side by side (B, T, C) and the layer's cache (key, value), each
    (B, nh, S, hs) with the past in front. ``attn_bias`` is None for full causal sequences without
    padding, else the additive mask of :func:`attention_bias`. The default is
    :func:`sdpa_attention`; the ``--kv-cache inplace`` export swaps in ONNX Runtime's fused op
    with :func:`attention_kernel` and traces this same forward.
    """

    def __call__(
        self,
        qkv: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        attn_bias: torch.Tensor | None,
        n_head: int,
        dropout_p: float,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]: ...


def sdpa_attention(
    qkv: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor] | None,
    attn_bias: torch.Tensor | None,
    n_head: int,
    dropout_p: float,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Multi-head attention with PyTorch's scaled_dot_product_attention (the default kernel)."""
    B, T, _ = qkv.shape
    q, k, v = qkv.chunk(3, dim=2)  # each (B, T, C)
    q = q.view(B, T, n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
    k = k.view(B, T, n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
    v = v.view(B, T, n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
    if past is not None:
        k = torch.cat([past[0], k], dim=2)  # (B, nh, S, hs)
        v = torch.cat([past[1], v], dim=2)  # (B, nh, S, hs)
    if attn_bias is None:
        # No cache and no padding: the fused causal kernel (flash attention where available).
        # NB: is_causal=True aligns the mask top-left, which is wrong once T < S, so the
        # cached path always passes an explicit mask instead.
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p)
    y = y.transpose(1, 2).contiguous().view(B, T, -1)  # re-assemble heads side by side
    return y, (k, v)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # query, key and value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection back into the residual stream
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kernel: AttentionKernel = sdpa_attention  # swapped only by attention_kernel()

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        dropout_p = self.dropout if self.training else 0.0
        y, present = self.kernel(self.c_attn(x), past, attn_bias, self.n_head, dropout_p)
        return self.resid_dropout(self.c_proj(y)), present


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attn_out, present = self.attn(self.ln_1(x), attn_bias, past)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, present


if TYPE_CHECKING:

    class _Transformer(nn.ModuleDict):
        """What ``GPT.transformer`` holds, for the type checker; at run time a plain ModuleDict."""

        wte: nn.Embedding
        wpe: nn.Embedding
        drop: nn.Dropout
        h: Sequence[Block]  # an nn.ModuleList of Blocks
        ln_f: nn.LayerNorm

else:
    _Transformer = nn.ModuleDict


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = _Transformer(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned positions
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the output head reads the token embedding matrix.
        self.lm_head.weight = self.transformer.wte.weight
        init_weights(self, config.init)

    def num_params(self) -> int:
        """Number of distinct parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: PastKeyValues | None = None,
        use_cache: bool = False,
    ) -> GPTOutput:
        """Logits for ``input_ids`` (B, T), optionally continuing a KV cache.

        attention_mask: (B, P + T), 1 for real tokens and 0 for (left) padding, covering the
            cached tokens and the new ones, as Hugging Face and ONNX Runtime GenAI use it.
        position_ids: (B, T); derived from attention_mask (or the cache length) when omitted.
        past_key_values: the cache returned by an earlier call (``use_cache=True``).
        targets: (B, T) ids to predict; positions set to -100 are ignored in the loss.
        """
        B, T = input_ids.shape
        P = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        # Keys the new tokens attend over. The mask's width says it when given: an ONNX graph
        # whose cache is a fixed-capacity buffer (--kv-cache inplace) has a past longer than P.
        S = attention_mask.shape[1] if attention_mask is not None else P + T
        if not _tracing():
            if past_key_values is not None and len(past_key_values) != self.config.n_layer:
                raise ConfigError(
                    f"past_key_values has {len(past_key_values)} layers, expected {self.config.n_layer}"
                )
            if S != P + T:
                raise ConfigError(
                    f"attention_mask covers {S} positions but the cache holds {P} and the input "
                    f"{T}; it must cover both"
                )
            # Learned positions end at block_size - 1. With padding, positions count real tokens
            # only, so the check is on the positions rather than on the cache length.
            last_position = S - 1 if position_ids is None and attention_mask is None else None
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, T, P, input_ids.device)
        if not _tracing():
            if last_position is None:
                last_position = int(position_ids.max())
            if last_position >= self.config.block_size:
                raise GenerationError(
                    f"position {last_position} is past the context of block_size "
                    f"{self.config.block_size} tokens; shorten the input"
                )

        attn_bias = None
        if attention_mask is not None or past_key_values is not None:
            attn_bias = attention_bias(
                attention_mask, T, S, self.transformer.wte.weight.dtype, input_ids.device
            )

        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)  # (B, T, C)
        x = self.transformer.drop(x)
        presents = []
        for i, block in enumerate(self.transformer.h):
            past = past_key_values[i] if past_key_values is not None else None
            x, present = block(x, attn_bias, past)
            presents.append(present)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100
            )
        cache = tuple(presents) if (use_cache or past_key_values is not None) else None
        return GPTOutput(logits, loss, cache)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        eot_token: int | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` after ``input_ids`` (B, T) with a KV cache; greedy at temperature 0.

        When the context fills up, the cache is rebuilt from the most recent half block
        (positions are absolute, so a cache cannot simply slide).
        """
        was_training = self.training
        self.eval()
        ids = input_ids
        block = self.config.block_size
        window = ids[:, -block:]
        out = self(window, use_cache=True)
        past = out.past_key_values
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1, :].float()
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            ids = torch.cat([ids, next_id], dim=1)
            if eot_token is not None and bool((next_id == eot_token).all()):
                break
            if past[0][0].shape[2] + 1 > block:
                out = self(ids[:, -(block // 2) :], use_cache=True)  # re-prefill a recent window
            else:
                out = self(next_id, past_key_values=past)
            past = out.past_key_values
        self.train(was_training)
        return ids


def default_position_ids(
    attention_mask: torch.Tensor | None, T: int, P: int, device: torch.device
) -> torch.Tensor:
    """Absolute positions of the T new tokens: counted over real tokens only when padded."""
    if attention_mask is None:
        return torch.arange(P, P + T, device=device).unsqueeze(0)  # (1, T)
    positions = attention_mask.long().cumsum(-1) - 1  # left padding shifts real tokens to 0
    return positions.clamp(min=0)[:, -T:]  # (B, T)


def attention_bias(
    attention_mask: torch.Tensor | None, T: int, S: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive attention mask (B or 1, 1, T, S): 0 where query i may see key j, dtype-min elsewhere.

    Query i sits at absolute index S - T + i, so it sees keys j <= S - T + i (causal with the past
    offset) that are not padding. A padding query would see nothing and softmax would give NaN, so
    every query is always allowed to see itself; padded positions' outputs are never used.
    """
    query_index = torch.arange(T, device=device) + (S - T)  # (T,)
    key_index = torch.arange(S, device=device)  # (S,)
    allowed = key_index[None, :] <= query_index[:, None]  # (T, S) causal, bottom-right aligned
    allowed = allowed[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        is_self = (key_index[None, :] == query_index[:, None])[None, None]
        allowed = (allowed & attention_mask[:, None, None, :].bool()) | is_self  # (B, 1, T, S)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def init_weights(model: GPT, scheme: str) -> None:
    """Initialise ``model`` in place with one of the schemes in ``gpt_core.config.INIT_SCHEMES``.

    gpt2:   N(0, 0.02) everywhere; residual projections N(0, 0.02 / sqrt(2 * n_layer)) so the
            residual stream's variance does not grow with depth (GPT-2 paper, section 2.3).
    neox:   "small init" N(0, sqrt(2 / (5 * n_embd))) (Nguyen & Salazar 2019) with residual
            projections N(0, 2 / (n_layer * sqrt(n_embd))) (Wang's init), as in GPT-NeoX.
    xavier: Glorot-uniform linear layers (fan-in/fan-out scaled), N(0, 0.02) embeddings, residual
            projections scaled by 1 / sqrt(2 * n_layer) like gpt2.
    Biases start at zero and LayerNorms at identity in every scheme.
    """
    cfg = model.config
    residual_scale = 1 / math.sqrt(2 * cfg.n_layer)
    small_std = math.sqrt(2 / (5 * cfg.n_embd))
    for name, module in model.named_modules():
        is_residual = name.endswith("c_proj")
        if isinstance(module, nn.Linear):
            if module is model.lm_head:
                continue  # tied to wte, initialised as an embedding below
            if scheme == "gpt2":
                std = 0.02 * (residual_scale if is_residual else 1.0)
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif scheme == "neox":
                std = 2 / (cfg.n_layer * math.sqrt(cfg.n_embd)) if is_residual else small_std
                nn.init.normal_(module.weight, mean=0.0, std=std)
            else:  # xavier
                nn.init.xavier_uniform_(module.weight, gain=residual_scale if is_residual else 1.0)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            std = small_std if scheme == "neox" else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


@contextlib.contextmanager
def attention_kernel(model: GPT, kernel: AttentionKernel) -> Iterator[GPT]:
    """Compute every block's attention with ``kernel`` inside the ``with``; restored afterwards.

    Everything else in the forward stays the model's own, so a graph traced inside (the
    ``--kv-cache inplace`` export) cannot drift from what training and parity run.
    """
    blocks = [block.attn for block in model.transformer.h]
    previous = [attn.kernel for attn in blocks]
    for attn in blocks:
        attn.kernel = kernel
    try:
        yield model
    finally:
        for attn, old in zip(blocks, previous, strict=True):
            attn.kernel = old


def fp32_cpu(model: GPT) -> GPT:
    """``model`` itself when it is already fp32 on the CPU, else an fp32 CPU copy (never moved)."""
    param = next(model.parameters())
    if param.dtype == torch.float32 and param.device.type == "cpu":
        return model
    return copy.deepcopy(model).float().cpu()


def _tracing() -> bool:
    """True while torch.export (the ONNX exporter), torch.compile or torch.jit trace the model.

    The forward's input checks read tensor values (``int(position_ids.max())``), which a trace
    cannot do, so they are skipped there.
    """
    return torch.compiler.is_exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing()
