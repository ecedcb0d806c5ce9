"""Parity: does ONNX Runtime compute what PyTorch computes, at the prompt and at cached steps?

Both sides get the same left-padded batch; each side feeds its *own* cache back, so a broken cache
path in the graph shows up as a growing difference over the decode steps. Every output over the
tolerance is listed at once (one ParityError naming them all), as Optimum's validation does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from gpt_core.model import GPT, fp32_cpu
from runtime.errors import ParityError
from runtime.generation import GenerationLoop
from runtime.onnx_contract import KV_INPLACE
from runtime.sampling import SamplingConfig
from runtime.session import OnnxSession

# Max abs difference allowed on logits and presents, per variant. fp32 is the real check: 1e-4 is
# what Optimum's exporter validation and ORT's GPT-2 tools allow for fp32 graphs. fp16 and int8 change the arithmetic on purpose; their bounds are loose enough
# for trained models (ORT's GPT-2 tool uses 0.2 and 3.0) and they are also judged by argmax and
# greedy agreement, which the report states. int4 (4-bit blocks of 128, 8-bit head) measured
# 0.20 on a trained small-cpu model, 0.3-0.4 on the tiny test models and 0.83 on random GPT-2
# 124M weights (presents 0.74): 2.0 leaves ~2.4x margin over the worst while still catching a
# broken graph (wrong weights or cache give differences of the logits' own size).
TOLERANCES = {"fp32": 1e-4, "fp16": 0.2, "int8": 1.0, "int4": 2.0}
# An int8 KV cache (`--kv-cache-dtype int8`) on any weights: presents are compared dequantized,
# and the bound is this or the weights' own, whichever is looser. Measured with fp32 weights: random
# GPT-2 124M 0.060, the tiny test models 0.007-0.03; over 128 teacher-forced positions of a trained
# small-cpu model 0.11 (argmax agreement 0.992). int8 weights: 0.126 on GPT-2 (their bound is 1.0).
KV_INT8_TOLERANCE = 0.5


@dataclass
class ParityReport:
    variant: str
    tolerance: float
    max_diff: dict[str, float] = field(default_factory=dict)  # output group -> max |diff|
    argmax_agreement: float = 1.0  # fraction of positions whose argmax matches PyTorch's
    greedy_match: int = 0  # greedy tokens identical to PyTorch's before the first difference
    greedy_total: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def worst(self) -> float:
        return max(self.max_diff.values(), default=0.0)

    def lines(self) -> list[str]:
        out = [f"Parity with PyTorch ({self.variant}, tolerance {self.tolerance:g}):"]
        for name, diff in self.max_diff.items():
            flag = "ok" if diff <= self.tolerance else "OVER"
            out.append(f"  {name:<40} max |diff| {diff:.2e}  {flag}")
        out.append(
            f"  argmax agreement {self.argmax_agreement:.3f}; "
            f"greedy {self.greedy_match}/{self.greedy_total} tokens identical"
        )
        return out


def verify_parity(
    model: GPT,
    onnx_path: str | os.PathLike[str],
    *,
    variant: str = "fp32",
    batch: int = 2,
    prompt_len: int = 8,
    decode_steps: int = 4,
    greedy_tokens: int = 16,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> ParityReport:
    """Compare logits and presents at a left-padded prompt and ``decode_steps`` cached steps.

    The ONNX side runs through the runtime's own ``OnnxSession``: the concatenated cache always,
    and for ``--kv-cache inplace`` files also the shared buffer the runtime decodes with. Also
    counts argmax agreement, and how many greedy tokens of the runtime's generation loop match
    PyTorch's own cached ``generate``. Raises ParityError listing every output over tolerance
    (unless told not to).
    """
    cfg = model.config
    # A staging file is checked once: nothing to keep in the optimised-graph cache.
    concat = OnnxSession(onnx_path, cache=False, io_binding=False)
    tolerance = TOLERANCES[variant]
    scales = None
    if concat.kv_dtype == np.int8:
        scales = _kv_scales(onnx_path, cfg.n_layer)
        tolerance = max(tolerance, KV_INT8_TOLERANCE)
        variant = f"{variant}, int8 KV cache"
    report = ParityReport(variant=variant, tolerance=tolerance)
    rng = np.random.default_rng(seed)
    prompt_len = max(1, min(prompt_len, cfg.block_size - decode_steps - 1))
    decode_steps = max(0, min(decode_steps, cfg.block_size - prompt_len))

    ids = rng.integers(0, cfg.vocab_size, (batch, prompt_len), dtype=np.int64)
    mask = np.ones((batch, prompt_len), dtype=np.int64)
    if batch > 1:
        mask[-1, : prompt_len // 3] = 0  # left padding on the last row
    steppers = {"": _Stepper(concat, batch, prompt_len + decode_steps, scales)}
    runtime_session = concat  # what the runtime decodes with on the CPU
    if concat.metadata.kv_cache == KV_INPLACE:  # the runtime's path: one buffer, written in place
        runtime_session = OnnxSession(onnx_path, cache=False)
        capacity = prompt_len + decode_steps
        steppers[", shared buffer"] = _Stepper(runtime_session, batch, capacity, scales)
    torch_past = None
    agree, total = 0, 0
    new_ids = ids
    reference = fp32_cpu(model)
    was_training = reference.training
    reference.eval()
    try:
        for step in range(decode_steps + 1):
            positions = (np.cumsum(mask, axis=-1) - 1).clip(min=0)[:, -new_ids.shape[1] :]
            with torch.no_grad():
                out = reference(
                    torch.from_numpy(new_ids),
                    attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions),
                    past_key_values=torch_past,
                    use_cache=True,
                )
            torch_past = out.past_key_values
            assert torch_past is not None  # use_cache=True
            ref_logits = out.logits.numpy()
            ref_presents = [t.numpy() for pair in torch_past for t in pair]
            where = "prompt" if step == 0 else f"decode step {step}"
            for suffix, stepper in steppers.items():
                logits, presents = stepper(new_ids, mask, positions)
                _compare(report, f"logits ({where}{suffix})", [ref_logits], [logits])
                _compare(report, f"present.* ({where}{suffix})", ref_presents, presents)
                real = mask[:, -new_ids.shape[1] :].astype(bool)  # padded positions: never used
                agree += int((ref_logits.argmax(-1) == logits.argmax(-1))[real].sum())
                total += int(real.sum())
            new_ids = ref_logits.argmax(-1)[:, -1:].astype(np.int64)  # both follow PyTorch
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)

        report.argmax_agreement = agree / max(total, 1)
        prompt = rng.integers(0, cfg.vocab_size, 6).tolist()
        n_tokens = max(0, min(greedy_tokens, cfg.block_size - len(prompt)))
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), n_tokens, temperature=0)
    finally:
        reference.train(was_training)
    produced = _runtime_greedy(runtime_session, prompt, n_tokens, cfg.vocab_size)
    report.greedy_match = common_prefix(expected[0, len(prompt) :].tolist(), produced)
    report.greedy_total = n_tokens

    for name, diff in report.max_diff.items():
        if not diff <= tolerance:  # NaN counts as a failure
            report.failures.append(f"{name} max |diff| {diff:.2e} > {tolerance:g}")
    if report.failures and raise_on_failure:
        raise ParityError(
            f"ONNX Runtime disagrees with PyTorch ({variant}): " + "; ".join(report.failures),
            report,
        )
    return report


class _Stepper:
    """Runs the graph step by step on its own cache, as the runtime does; presents as numpy
    (an int8 cache dequantized with its scales)."""

    def __init__(
        self,
        session: OnnxSession,
        batch: int,
        capacity: int,
        scales: list[np.ndarray] | None = None,
    ) -> None:
        self.session = session
        self.cache = session.empty_cache(batch, capacity=capacity)
        self.scales = scales

    def __call__(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, self.cache = self.session.run(input_ids, attention_mask, position_ids, self.cache)
        length = self.cache.length
        presents = [np.asarray(value)[:, :, :length] for value in self.cache.values]
        if self.scales is not None:
            presents = [p * s for p, s in zip(presents, self.scales, strict=True)]
        return logits, presents


def _kv_scales(onnx_path: str | os.PathLike[str], n_layer: int) -> list[np.ndarray]:
    """An int8 cache's scales, in ``past_key_values.*`` order, from the file's initializers (a
    second read of the file, once per check: ONNX Runtime does not expose initializers)."""
    import onnx
    from onnx import numpy_helper

    from export.inplace_cache import kv_scale_names

    wanted = [name for layer in range(n_layer) for name in kv_scale_names(layer)]
    graph = onnx.load(str(onnx_path)).graph
    found = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in wanted}
    missing = [name for name in wanted if name not in found]
    if missing:
        raise ParityError(f"{onnx_path} has an int8 KV cache but no scale {missing[0]}")
    return [found[name].astype(np.float32) for name in wanted]


def _runtime_greedy(
    session: OnnxSession, prompt: list[int], n_tokens: int, vocab_size: int
) -> list[int]:
    """``n_tokens`` greedy ids after ``prompt`` from the runtime's own generation loop."""
    if n_tokens == 0:
        return []
    config = SamplingConfig(max_new_tokens=n_tokens, temperature=0.0, stop_at_eot=False)
    # Every id the model can produce (its vocabulary may be larger than the tokenizer's), as
    # PyTorch's argmax sees them.
    loop = GenerationLoop(session, [prompt], config, n_vocab=vocab_size)
    return [token.id for token in loop]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids two generations share (greedy agreement)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _compare(report: ParityReport, name: str, reference: list, actual: list) -> None:
    """Record the max |diff| over matching tensors; a shape mismatch is a failure by itself."""
    diff = 0.0
    for ref, got in zip(reference, actual, strict=True):
        if ref.shape != got.shape:
            report.failures.append(f"{name}: shape {got.shape} != PyTorch {ref.shape}")
            return
        if ref.size:
            d = float(np.abs(ref.astype(np.float64) - got.astype(np.float64)).max())
            if np.isnan(d):
                diff = d
                break
            diff = max(diff, d)
    report.max_diff[name] = diff
