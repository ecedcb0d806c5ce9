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

from gpt_core.model import GPT
from runtime.errors import ParityError

# Max abs difference allowed on logits and presents, per variant. fp32 is the real check (ANCHORS
# pitfall 9: 1e-4). fp16 and int8 change the arithmetic on purpose; their bounds are loose enough
# for trained models (ORT's GPT-2 tool uses 0.2 and 3.0) and they are also judged by argmax and
# greedy agreement, which the report states.
TOLERANCES = {"fp32": 1e-4, "fp16": 0.2, "int8": 1.0}


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


def open_session(path: str | os.PathLike[str]):
    """A CPU InferenceSession with ORT's default optimisations (what the runtime uses)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def kv_dtype(session) -> type:
    """The cache dtype the graph expects (fp16 exports take fp16 past tensors)."""
    past = next(i for i in session.get_inputs() if i.name.startswith("past_key_values"))
    return np.float16 if "float16" in past.type else np.float32


def empty_cache(session, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past tensors for the first (prompt) step: (batch, n_head, 0, head_dim)."""
    dtype = kv_dtype(session)
    return {
        i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=dtype)
        for i in session.get_inputs()
        if i.name.startswith("past_key_values")
    }


def run_step(
    session,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    position_ids: np.ndarray,
    past: dict[str, np.ndarray],
) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
    """One ONNX forward: (logits, presents in output order, the past for the next step)."""
    feed = {
        "input_ids": input_ids.astype(np.int64),
        "attention_mask": attention_mask.astype(np.int64),
        "position_ids": position_ids.astype(np.int64),
        **past,
    }
    names = [o.name for o in session.get_outputs()]
    results = session.run(None, feed)
    presents = results[1:]
    next_past = {
        n.replace("present", "past_key_values", 1): v
        for n, v in zip(names[1:], presents, strict=True)
    }
    return results[0], presents, next_past


def greedy_onnx(session, prompt: list[int], n_tokens: int) -> list[int]:
    """``n_tokens`` greedy ids after ``prompt``, decoded with the graph's KV cache (batch 1)."""
    ids = np.array([prompt], dtype=np.int64)
    past = empty_cache(session, 1)
    length, produced = len(prompt), []
    for _ in range(n_tokens):
        positions = np.arange(length - ids.shape[1], length, dtype=np.int64)[None]
        logits, _, past = run_step(session, ids, np.ones((1, length), np.int64), positions, past)
        token = int(logits[0, -1].argmax())
        produced.append(token)
        ids = np.array([[token]], dtype=np.int64)
        length += 1
    return produced


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

    Also counts argmax agreement and how many greedy tokens match PyTorch's own cached
    ``generate``. Raises ParityError listing every output over tolerance (unless told not to).
    """
    cfg = model.config
    tolerance = TOLERANCES[variant]
    session = open_session(onnx_path)
    report = ParityReport(variant=variant, tolerance=tolerance)
    rng = np.random.default_rng(seed)
    prompt_len = max(1, min(prompt_len, cfg.block_size - decode_steps - 1))
    decode_steps = max(0, min(decode_steps, cfg.block_size - prompt_len))

    ids = rng.integers(0, cfg.vocab_size, (batch, prompt_len), dtype=np.int64)
    mask = np.ones((batch, prompt_len), dtype=np.int64)
    if batch > 1:
        mask[-1, : prompt_len // 3] = 0  # left padding on the last row
    steppers = {"": ConcatStepper(session, batch)}
    if _is_inplace(session):  # also the runtime's own path: one buffer shared by past and present
        steppers[", shared buffer"] = SharedBufferStepper(
            onnx_path, batch, prompt_len + decode_steps
        )
    torch_past = None
    agree, total = 0, 0
    new_ids = ids
    with _eval_fp32(model) as reference:
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
        expected = expected[0, len(prompt) :].tolist()
    produced = greedy_onnx(session, prompt, n_tokens)
    report.greedy_match = _common_prefix(expected, produced)
    report.greedy_total = n_tokens

    for name, diff in report.max_diff.items():
        if not diff <= tolerance:  # NaN counts as a failure
            report.failures.append(f"{name} max |diff| {diff:.2e} > {tolerance:g}")
    if report.failures and raise_on_failure:
        raise ParityError(
            f"ONNX Runtime disagrees with PyTorch ({variant}): " + "; ".join(report.failures)
        )
    return report


class ConcatStepper:
    """Feeds the graph its own presents back as the next past (the standard ONNX contract)."""

    def __init__(self, session, batch: int) -> None:
        self.session = session
        self.past = empty_cache(session, batch)

    def __call__(self, input_ids, attention_mask, position_ids) -> tuple[np.ndarray, list]:
        logits, presents, self.past = run_step(
            self.session, input_ids, attention_mask, position_ids, self.past
        )
        return logits, presents


class SharedBufferStepper:
    """The runtime's in-place path: past and present bound to one buffer per layer and kind."""

    def __init__(self, path: str | os.PathLike[str], batch: int, capacity: int) -> None:
        from runtime.session import OnnxSession

        self.session = OnnxSession(path, cache=False)  # a staging file: nothing to keep
        self.cache = self.session.empty_cache(batch, capacity=capacity)

    def __call__(self, input_ids, attention_mask, position_ids) -> tuple[np.ndarray, list]:
        logits, self.cache = self.session.run(input_ids, attention_mask, position_ids, self.cache)
        return logits, [buffer[:, :, : self.cache.length] for buffer in self.cache.values]


def _is_inplace(session) -> bool:
    from runtime.metadata import KV_INPLACE, ModelMetadata

    props = session.get_modelmeta().custom_metadata_map
    return ModelMetadata.from_props(props).kv_cache == KV_INPLACE


class _eval_fp32:
    """Context manager: an fp32 CPU eval-mode view of ``model``, its mode restored afterwards."""

    def __init__(self, model: GPT) -> None:
        from export.onnx_export import _fp32_cpu

        self.model = _fp32_cpu(model)
        self.was_training = self.model.training

    def __enter__(self) -> GPT:
        return self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


def _common_prefix(a: list[int], b: list[int]) -> int:
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
