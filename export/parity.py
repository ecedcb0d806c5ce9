"""Parity: does ONNX Runtime compute what PyTorch computes, at the prompt and at cached steps?

Both sides get the same left-padded batch; each side feeds its *own* cache back, so a broken cache
path in the graph shows up as a growing difference over the decode steps. Every output over the
tolerance is listed at once (one ParityError naming them all), as Optimum's validation does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gpt_core.model import GPT
from runtime.errors import ParityError

# Max abs difference allowed on logits and presents, per variant. fp32 is the real check; the
# quantised and half-precision variants are judged mostly by argmax and greedy agreement.
TOLERANCES = {"fp32": 1e-4, "fp16": 5e-2, "int8": 1.0}


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

    def lines(self) -> list[str]:
        out = [f"parity ({self.variant}, tolerance {self.tolerance:g}):"]
        for name, diff in self.max_diff.items():
            flag = "ok" if diff <= self.tolerance else "OVER"
            out.append(f"  {name:<28} max |diff| {diff:.2e}  {flag}")
        out.append(
            f"  argmax agreement {self.argmax_agreement:.3f}; greedy {self.greedy_match}/{self.greedy_total} tokens identical"
        )
        return out


def verify_parity(
    model: GPT,
    onnx_path: str | Path,
    *,
    variant: str = "fp32",
    batch: int = 2,
    prompt_len: int = 8,
    decode_steps: int = 4,
    greedy_tokens: int = 16,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> ParityReport:
    """Compare logits and presents at the prompt and ``decode_steps`` cached steps."""
    import onnxruntime as ort

    model = model.float().cpu().eval()
    cfg = model.config
    tolerance = TOLERANCES[variant]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    kv_dtype = np.float16 if "float16" in session.get_inputs()[3].type else np.float32
    report = ParityReport(variant=variant, tolerance=tolerance)
    rng = np.random.default_rng(seed)
    prompt_len = min(prompt_len, cfg.block_size - decode_steps - 1)

    ids = rng.integers(0, cfg.vocab_size, (batch, prompt_len), dtype=np.int64)
    mask = np.ones((batch, prompt_len), dtype=np.int64)
    if batch > 1:
        mask[-1, : prompt_len // 3] = 0  # left padding on the last row
    ort_past = empty_cache(cfg.n_layer, batch, cfg.n_head, cfg.head_dim, kv_dtype)
    torch_past = None
    agree, total = 0, 0
    new_ids = ids
    for step in range(decode_steps + 1):
        positions = (np.cumsum(mask, axis=-1) - 1).clip(min=0)[:, -new_ids.shape[1] :]
        with torch.no_grad():
            out = model(
                torch.from_numpy(new_ids),
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions),
                past_key_values=torch_past,
                use_cache=True,
            )
        torch_past = out.past_key_values
        feed = {"input_ids": new_ids, "attention_mask": mask, "position_ids": positions}
        feed.update(ort_past)
        results = session.run(None, feed)
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, results, strict=True))
        where = "prefill" if step == 0 else f"decode step {step}"
        _compare(report, f"logits ({where})", out.logits.numpy(), got["logits"])
        ref_presents = [t.numpy() for pair in torch_past for t in pair]
        ort_presents = [got[n] for n in names[1:]]
        _compare(report, f"present.* ({where})", ref_presents, ort_presents)
        ref_top = out.logits.numpy().argmax(-1)
        agree += int((ref_top == got["logits"].argmax(-1)).sum())
        total += ref_top.size
        ort_past = {
            n.replace("present", "past_key_values"): v
            for n, v in zip(names[1:], ort_presents, strict=True)
        }
        new_ids = ref_top[:, -1:].astype(np.int64)  # both sides continue with PyTorch's choice
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
    report.argmax_agreement = agree / total
    report.greedy_match, report.greedy_total = greedy_agreement(
        model, session, kv_dtype, greedy_tokens, rng
    )
    for name, diff in report.max_diff.items():
        if not diff <= tolerance:  # NaN counts as a failure
            report.failures.append(f"{name}: max |diff| {diff:.2e} > {tolerance:g}")
    if report.failures and raise_on_failure:
        raise ParityError(
            f"ONNX Runtime disagrees with PyTorch ({variant}): " + "; ".join(report.failures)
        )
    return report


def greedy_agreement(model: GPT, session, kv_dtype, n_tokens: int, rng) -> tuple[int, int]:
    """How many greedy tokens ONNX Runtime produces identically to PyTorch with a cache."""
    cfg = model.config
    prompt = rng.integers(0, cfg.vocab_size, (1, 6), dtype=np.int64)
    n_tokens = min(n_tokens, cfg.block_size - prompt.shape[1])
    with torch.no_grad():
        reference = model.generate(torch.from_numpy(prompt), n_tokens, temperature=0)[
            0, 6:
        ].tolist()
    past = empty_cache(cfg.n_layer, 1, cfg.n_head, cfg.head_dim, kv_dtype)
    names = [o.name for o in session.get_outputs()]
    ids, length, produced = prompt, prompt.shape[1], []
    for _ in range(n_tokens):
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((1, length), dtype=np.int64),
            "position_ids": np.arange(length - ids.shape[1], length, dtype=np.int64)[None],
            **past,
        }
        results = session.run(None, feed)
        token = int(results[0][0, -1].argmax())
        produced.append(token)
        past = {
            n.replace("present", "past_key_values"): v
            for n, v in zip(names[1:], results[1:], strict=True)
        }
        ids = np.array([[token]], dtype=np.int64)
        length += 1
    match = 0
    for a, b in zip(reference, produced, strict=True):
        if a != b:
            break
        match += 1
    return match, n_tokens


def empty_cache(
    n_layer: int, batch: int, n_head: int, head_dim: int, dtype
) -> dict[str, np.ndarray]:
    """Zero-length past tensors for the first (prompt) step."""
    cache = {}
    for i in range(n_layer):
        for kind in ("key", "value"):
            cache[f"past_key_values.{i}.{kind}"] = np.zeros(
                (batch, n_head, 0, head_dim), dtype=dtype
            )
    return cache


def _compare(report: ParityReport, name: str, reference, actual) -> None:
    if not isinstance(reference, list):
        reference, actual = [reference], [actual]
    diff = 0.0
    for ref, got in zip(reference, actual, strict=True):
        if ref.shape != got.shape:
            report.failures.append(f"{name}: shape {got.shape} != PyTorch {ref.shape}")
            return
        d = (
            float(np.abs(ref.astype(np.float64) - got.astype(np.float64)).max())
            if ref.size
            else 0.0
        )
        diff = d if np.isnan(d) else max(diff, d)
    report.max_diff[name] = diff
