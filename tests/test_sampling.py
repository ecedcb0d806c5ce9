"""Sampling in numpy: validation, each processor, and properties over arbitrary logits."""

from __future__ import annotations

import dataclasses
import math
import typing

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from runtime.errors import ConfigError, GptkitError
from runtime.sampling import (
    SamplingConfig,
    SamplingOptions,
    choose_token,
    log_softmax,
    process_logits,
)

# ---- SamplingConfig ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("temperature", -0.1, "temperature must be >= 0"),
        ("temperature", math.nan, "temperature must be a number"),
        ("temperature", math.inf, "temperature must be finite"),
        ("top_p", 0.0, "top_p must be in (0, 1]"),
        ("top_p", 1.5, "top_p must be in (0, 1]"),
        ("top_k", -1, "top_k must be >= 0"),
        ("top_k", 2.5, "top_k must be an integer"),
        ("min_p", -0.1, "min_p must be in [0, 1]"),
        ("min_p", 1.1, "min_p must be in [0, 1]"),
        ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
        ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
        ("max_new_tokens", True, "max_new_tokens must be an integer"),
        ("seed", -1, "seed must be >= 0"),
        ("stop", [""], "stop strings must be non-empty"),
        ("stop", 5, "stop must be a string or a list of strings"),
        ("stop_at_eot", "yes", "stop_at_eot must be True or False"),
    ],
)
def test_invalid_values_raise_one_line_config_errors(field: str, value: object, needle: str):
    with pytest.raises(ConfigError) as info:
        SamplingConfig(**{field: value})
    message = str(info.value)
    assert needle in message
    assert "\n" not in message
    assert isinstance(info.value, GptkitError) and isinstance(info.value, ValueError)


def test_stop_accepts_one_string_or_a_list():
    assert SamplingConfig(stop="\n\n").stop == ("\n\n",)
    assert SamplingConfig(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingConfig(stop=None).stop == ()


def test_sampling_options_match_the_config_fields():
    """The TypedDict behind ``Model.generate(**options)`` has one optional key per field."""
    fields = {f.name: f for f in dataclasses.fields(SamplingConfig)}
    assert set(SamplingOptions.__annotations__) == set(fields)
    assert SamplingOptions.__optional_keys__ == frozenset(fields)
    option_types = typing.get_type_hints(SamplingOptions)
    config_types = typing.get_type_hints(SamplingConfig)
    for name in fields:
        if name in ("stop", "logit_bias"):  # wider (a str / a dict too), normalised to a tuple
            assert config_types[name] in typing.get_args(option_types[name])
        else:
            assert option_types[name] == config_types[name], name


# ---- each processor ---------------------------------------------------------------------------

GREEDY = SamplingConfig(temperature=0)


def test_greedy_is_argmax_and_ignores_ids_past_the_tokenizer():
    logits = np.array([0.1, 3.0, 0.2, 9.0])  # id 3 exists only in the padded model vocabulary
    rng = np.random.default_rng(0)
    assert choose_token(logits, GREEDY, rng, n_vocab=4) == 3
    assert choose_token(logits, GREEDY, rng, n_vocab=3) == 1


def test_nan_counts_as_minus_infinity_and_plus_infinity_takes_all():
    rng = np.random.default_rng(0)
    assert choose_token(np.array([np.nan, 1.0, 0.0]), GREEDY, rng, n_vocab=3) == 1
    cfg = SamplingConfig(temperature=1.0)
    picks = {
        choose_token(np.array([np.inf, 5.0, np.inf, 9.0]), cfg, rng, n_vocab=4) for _ in range(50)
    }
    assert picks == {0, 2}


def test_all_invalid_logits_still_give_a_valid_id():
    rng = np.random.default_rng(0)
    for cfg in (GREEDY, SamplingConfig(temperature=1.0, top_p=0.5)):
        assert choose_token(np.full(5, -np.inf), cfg, rng, n_vocab=3) in range(3)
        assert choose_token(np.full(5, np.nan), cfg, rng, n_vocab=3) in range(3)


def test_tiny_temperature_does_not_overflow_into_nan():
    with np.errstate(all="raise"):
        cfg = SamplingConfig(temperature=1e-300)
        token = choose_token(np.array([1e10, 0.0, -5.0]), cfg, np.random.default_rng(0), n_vocab=3)
    assert token == 0


def test_repetition_penalty_lowers_seen_tokens_either_sign():
    cfg = SamplingConfig(temperature=0, repetition_penalty=2.0)
    scores = process_logits(np.array([4.0, -1.0, 3.0]), cfg, n_vocab=3, context=[0, 1, 0])
    assert scores.tolist() == [2.0, -2.0, 3.0]
    assert (
        choose_token(
            np.array([4.0, -1.0, 3.0]), cfg, np.random.default_rng(0), n_vocab=3, context=[0]
        )
        == 2
    )


def test_top_k_one_is_greedy_whatever_the_seed():
    logits = np.random.default_rng(1).normal(size=100)
    cfg = SamplingConfig(temperature=1.5, top_k=1)
    picks = {choose_token(logits, cfg, np.random.default_rng(s), n_vocab=100) for s in range(20)}
    assert picks == {int(np.argmax(logits))}


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    cfg = SamplingConfig(temperature=1.0, top_p=0.75)
    kept = np.isfinite(process_logits(np.log(probs), cfg, n_vocab=4))
    assert kept.tolist() == [True, True, False, False]


def test_min_p_is_relative_to_the_top_probability():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    cfg = SamplingConfig(temperature=1.0, min_p=0.25)  # keep p >= 0.125
    kept = np.isfinite(process_logits(np.log(probs), cfg, n_vocab=4))
    assert kept.tolist() == [True, True, True, False]


def test_sampling_follows_the_distribution():
    probs = np.array([0.7, 0.2, 0.1])
    rng = np.random.default_rng(7)
    cfg = SamplingConfig(temperature=1.0)
    counts = np.bincount(
        [choose_token(np.log(probs), cfg, rng, n_vocab=3) for _ in range(3000)], minlength=3
    )
    # Binomial standard deviation is at most ~25 draws here; 5 sigma is 125.
    assert np.all(np.abs(counts - 3000 * probs) < 125), counts


def test_seeded_generators_repeat_their_choices():
    logits = np.random.default_rng(3).normal(size=50)
    cfg = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9)

    def draw(seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        return [choose_token(logits, cfg, rng, n_vocab=50) for _ in range(30)]

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_log_softmax_normalises_and_keeps_minus_infinity():
    out = log_softmax(np.array([[1.0, 2.0, -np.inf], [-np.inf, -np.inf, -np.inf]]))
    assert math.isclose(np.exp(out[0]).sum(), 1.0)
    assert out[0, 2] == -np.inf
    assert np.all(out[1] == -np.inf)


# ---- properties over arbitrary logits ---------------------------------------------------------

logits_arrays = arrays(
    np.float32,
    st.integers(1, 40),
    elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
)
valid_configs = st.builds(
    SamplingConfig,
    temperature=st.one_of(st.just(0.0), st.floats(1e-3, 10.0)),
    top_k=st.integers(0, 50),
    top_p=st.floats(1e-3, 1.0),
    min_p=st.floats(0.0, 1.0),
    repetition_penalty=st.floats(0.5, 2.0),
)


@given(logits=logits_arrays, cfg=valid_configs, data=st.data())
def test_any_logits_and_valid_settings_give_an_id_no_processor_removed(logits, cfg, data):
    n_vocab = data.draw(st.integers(1, logits.size), label="n_vocab")
    context = data.draw(st.lists(st.integers(0, logits.size - 1), max_size=8), label="context")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    token = choose_token(logits, cfg, np.random.default_rng(seed), n_vocab=n_vocab, context=context)
    assert 0 <= token < n_vocab
    scores = process_logits(logits, cfg, n_vocab=n_vocab, context=context)
    if np.isfinite(scores).any():  # something survived: the choice must be among the survivors
        assert np.isfinite(scores[token])


@given(
    logits=arrays(np.float64, st.integers(2, 40), elements=st.floats(-30, 30)),
    top_k=st.integers(1, 40),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_truncation_warpers_never_pick_a_token_they_remove(logits, top_k, top_p, min_p, seed):
    n = logits.size
    cfg = SamplingConfig(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p)
    token = choose_token(logits, cfg, np.random.default_rng(seed), n_vocab=n)
    # top-k: at least as large as the k-th largest logit
    assert logits[token] >= np.sort(logits)[::-1][min(top_k, n) - 1]
    # top-p: inside the nucleus of the top-k survivors (computed independently, by sorting)
    kept = logits >= np.sort(logits)[::-1][min(top_k, n) - 1]
    probs = np.where(kept, np.exp(logits - logits.max()), 0.0)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]  # mass strictly more likely than each id
    nucleus = set(order[before < top_p + 1e-9].tolist())
    assert token in nucleus
    # min-p: at least min_p times the most likely id's probability
    assert probs[token] >= min_p * probs.max() - 1e-12


def test_openai_penalties_count_generated_tokens_only():
    logits = np.array([5.0, 4.5, 0.0])
    frequency = SamplingConfig(temperature=0, frequency_penalty=0.3)
    # 0 was generated twice: 5 - 2 * 0.3 = 4.4 < 4.5; in the prompt only, it is not penalised
    assert choose_token(logits, frequency, None, n_vocab=3, generated=[0, 0]) == 1
    assert choose_token(logits, frequency, None, n_vocab=3, context=[0, 0]) == 0
    presence = SamplingConfig(temperature=0, presence_penalty=0.4)  # once, however many times
    assert choose_token(logits, presence, None, n_vocab=3, generated=[0, 0, 0]) == 0
    assert (
        choose_token(
            logits,
            SamplingConfig(temperature=0, presence_penalty=0.6),
            None,
            n_vocab=3,
            generated=[0],
        )
        == 1
    )


def test_logit_bias_is_added_first_and_checked():
    logits = np.array([5.0, 4.5, 0.0])
    config = SamplingConfig(temperature=0, logit_bias={2: 100})
    assert config.logit_bias == ((2, 100.0),)
    assert choose_token(logits, config, None, n_vocab=3) == 2
    banned = SamplingConfig(temperature=0, logit_bias=[(0, -100)])
    assert choose_token(logits, banned, None, n_vocab=3) == 1
    for bad, message in (({0: 101}, "-100, 100"), ({-1: 1}, "id"), ("x", "logit_bias")):
        with pytest.raises(ConfigError, match=message):
            SamplingConfig(logit_bias=bad)
    with pytest.raises(ConfigError, match="presence_penalty"):
        SamplingConfig(presence_penalty=3)
