"""The GPT: causality, KV cache == full forward, left padding, size, generation, init, dropout."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gpt_core.config import INIT_SCHEMES, PRESETS, GPTConfig
from gpt_core.model import GPT

ATOL = 1e-5


def ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def decode_with_cache(model: GPT, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits for every position: prefill ``prefill`` tokens, then feed the rest one at a time."""
    out = model(tokens[:, :prefill], use_cache=True)
    logits, past = [out.logits], out.past_key_values
    for t in range(prefill, tokens.shape[1]):
        out = model(tokens[:, t : t + 1], past_key_values=past, use_cache=True)
        logits.append(out.logits)
        past = out.past_key_values
    return torch.cat(logits, dim=1)


# ---- causality and the cache ----------------------------------------------------------------------


@given(position=st.integers(0, 15), token=st.integers(0, 511))
def test_a_future_token_never_changes_earlier_logits(
    tiny_model: GPT, position: int, token: int
) -> None:
    x = ids(2, 16, tiny_model.config.vocab_size)
    changed = x.clone()
    changed[:, position] = token
    with torch.no_grad():
        before, after = tiny_model(x).logits, tiny_model(changed).logits
    if position:
        assert max_diff(before[:, :position], after[:, :position]) < 1e-6
    if token != x[0, position]:  # sanity: the change itself is visible from its position on
        assert max_diff(before[0, position:], after[0, position:]) > 0


@pytest.mark.parametrize("prefill", [1, 5, 15])
def test_cached_decoding_equals_one_full_forward(tiny_model: GPT, prefill: int) -> None:
    x = ids(2, 20, tiny_model.config.vocab_size)
    with torch.no_grad():
        full = tiny_model(x).logits
    cached = decode_with_cache(tiny_model, x, prefill)
    assert cached.shape == full.shape
    assert max_diff(cached, full) < ATOL


def test_cache_shapes(tiny_model: GPT) -> None:
    cfg = tiny_model.config
    out = tiny_model(ids(3, 7, cfg.vocab_size), use_cache=True)
    assert out.logits.shape == (3, 7, cfg.vocab_size)
    assert len(out.past_key_values) == cfg.n_layer
    for key, value in out.past_key_values:
        assert key.shape == value.shape == (3, cfg.n_head, 7, cfg.head_dim)
    assert tiny_model(ids(3, 7, cfg.vocab_size)).past_key_values is None


def test_a_left_padded_batch_equals_each_row_alone(tiny_model: GPT) -> None:
    """Prefill a padded batch, decode 3 more tokens; real positions match unpadded runs."""
    vocab = tiny_model.config.vocab_size
    rows = [ids(1, n, vocab, seed=n)[0] for n in (9, 4, 6)]
    width, steps = max(len(r) for r in rows), 3
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    new = ids(len(rows), steps, vocab, seed=99)

    with torch.no_grad():
        out = tiny_model(batch, attention_mask=mask, use_cache=True)
        logits, past = [out.logits], out.past_key_values
        for t in range(steps):
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
            out = tiny_model(new[:, t : t + 1], attention_mask=mask, past_key_values=past)
            logits.append(out.logits)
            past = out.past_key_values
        padded = torch.cat(logits, dim=1)
        assert torch.isfinite(padded).all()  # padding queries must not produce NaN
        for i, row in enumerate(rows):
            alone = tiny_model(torch.cat([row, new[i]])[None]).logits[0]
            assert max_diff(padded[i, width - len(row) :], alone) < ATOL, f"row {i}"


def test_sequences_longer_than_the_block_are_refused(tiny_model: GPT) -> None:
    block = tiny_model.config.block_size
    with pytest.raises(ValueError, match="block_size"):
        tiny_model(ids(1, block + 1, tiny_model.config.vocab_size))


# ---- size -----------------------------------------------------------------------------------------


def test_gpt2_preset_has_124m_parameters() -> None:
    with torch.device("meta"):  # shapes only: no 500 MB allocation
        model = GPT(PRESETS["gpt2"])
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_params() == 124_439_808


def test_tiny_model_parameter_count(tiny_model: GPT) -> None:
    c = tiny_model.config
    per_layer = 12 * c.n_embd**2 + 13 * c.n_embd  # attn + mlp weights and biases, 2 layer norms
    expected = (c.vocab_size + c.block_size) * c.n_embd + c.n_layer * per_layer + 2 * c.n_embd
    assert tiny_model.num_params() == expected


# ---- generation -----------------------------------------------------------------------------------


@torch.no_grad()
def greedy_without_cache(model: GPT, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    x = prompt
    for _ in range(steps):
        next_id = model(x).logits[:, -1].argmax(dim=-1, keepdim=True)
        x = torch.cat([x, next_id], dim=1)
    return x


def test_greedy_generate_equals_recomputing_everything(tiny_model: GPT) -> None:
    prompt = ids(2, 5, tiny_model.config.vocab_size)
    fast = tiny_model.generate(prompt, 30, temperature=0)
    assert fast.shape == (2, 35)
    assert torch.equal(fast[:, :5], prompt)
    assert torch.equal(fast, greedy_without_cache(tiny_model, prompt, 30))


def test_top_k_1_is_greedy_and_sampling_is_seeded(tiny_model: GPT) -> None:
    prompt = ids(1, 4, tiny_model.config.vocab_size)
    greedy = tiny_model.generate(prompt, 10, temperature=0)
    assert torch.equal(tiny_model.generate(prompt, 10, top_k=1), greedy)

    def sample(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return tiny_model.generate(prompt, 10, temperature=1.0, top_k=50, generator=generator)

    assert torch.equal(sample(7), sample(7))


def test_generate_runs_past_the_context_window(tiny_model: GPT) -> None:
    block = tiny_model.config.block_size
    out = tiny_model.generate(ids(1, 10, tiny_model.config.vocab_size), block, temperature=0)
    assert out.shape == (1, 10 + block)


def test_generate_stops_at_eot(tiny_model: GPT) -> None:
    prompt = ids(1, 5, tiny_model.config.vocab_size)
    first = tiny_model.generate(prompt, 1, temperature=0)[0, -1].item()
    out = tiny_model.generate(prompt, 20, temperature=0, eot_token=first)
    assert out.shape == (1, 6)


def test_generate_restores_training_mode(tiny_model: GPT) -> None:
    tiny_model.train()
    tiny_model.generate(ids(1, 3, tiny_model.config.vocab_size), 2, temperature=0)
    assert tiny_model.training


# ---- initialisation, loss and dropout -------------------------------------------------------------


@pytest.mark.parametrize("init", INIT_SCHEMES)
def test_init_gives_loss_near_uniform(init: str) -> None:
    torch.manual_seed(0)
    config = GPTConfig.preset("tiny", init=init)
    model = GPT(config).eval()
    x, y = ids(4, 32, config.vocab_size, seed=1), ids(4, 32, config.vocab_size, seed=2)
    loss = model(x, y).loss.item()
    assert math.isfinite(loss)
    assert abs(loss - math.log(config.vocab_size)) < 0.5, loss


def test_ignored_targets_do_not_count(tiny_model: GPT) -> None:
    x = ids(1, 8, tiny_model.config.vocab_size)
    y = ids(1, 8, tiny_model.config.vocab_size, seed=5)
    masked = y.clone()
    masked[:, :4] = -100
    with torch.no_grad():
        logits = tiny_model(x).logits
        expected = torch.nn.functional.cross_entropy(logits[0, 4:], y[0, 4:])
        assert max_diff(tiny_model(x, masked).loss, expected) < 1e-6


def test_dropout_is_off_in_eval() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", dropout=0.5))
    x = ids(2, 16, model.config.vocab_size)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, model(x).logits)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x).logits, model(x).logits)  # the test can fail
