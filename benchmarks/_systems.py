"""The systems the decode benchmark compares, each behind one ``generate(prompt, n) -> Run``.

A worker process builds one of them (``make_system``) and times it. Each adapter imports its own
stack (torch, transformers, onnxruntime, onnxruntime-genai, the gptkit runtime) only when it is
built, so a worker loads nothing but the system it measures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import _common as common
import numpy as np
from _artifacts import ARTIFACTS

from runtime import onnx_contract as contract

# system -> (label, file it runs: a key of ARTIFACTS; torch and hf load the same weights
# from weights.pt); the order is the order of the runs and rows.
SYSTEMS = {
    "torch": ("PyTorch eager, gpt_core GPT + KV cache", "fp32"),
    "hf": ("HF GPT2LMHeadModel.generate(use_cache=True)", "fp32"),
    "ortloop": ("numpy + onnxruntime loop (benchmark's own)", "fp32"),
    "genai": ("onnxruntime-genai, type decoder, default export, share buffer off", "fp32"),
    "gptkit": ("gptkit runtime, default export (concat cache)", "fp32"),
    "genai-inplace": (
        "onnxruntime-genai, type decoder, in-place export, past_present_share_buffer on",
        "inplace-fp32",
    ),
    "gptkit-inplace": (
        "gptkit runtime, `--kv-cache inplace` export (shared buffer)",
        "inplace-fp32",
    ),
    "genai-int8": ("onnxruntime-genai, type decoder, default export, share buffer off", "int8"),
    "gptkit-int8": ("gptkit runtime, default export (concat cache)", "int8"),
    "genai-inplace-int8": (
        "onnxruntime-genai, type decoder, in-place export, past_present_share_buffer on",
        "inplace-int8",
    ),
    "gptkit-inplace-int8": (
        "gptkit runtime, `--kv-cache inplace` export (shared buffer)",
        "inplace-int8",
    ),
    "genai-int4": ("onnxruntime-genai, type decoder, default export, share buffer off", "int4"),
    "gptkit-int4": ("gptkit runtime, default export (concat cache)", "int4"),
    "genai-inplace-int4": (
        "onnxruntime-genai, type decoder, in-place export, past_present_share_buffer on",
        "inplace-int4",
    ),
    "gptkit-inplace-int4": (
        "gptkit runtime, `--kv-cache inplace` export (shared buffer)",
        "inplace-int4",
    ),
}
for _precision in ("fp32", "int8", "int4"):  # the in-place exports with an int8 KV cache
    _suffix = "" if _precision == "fp32" else f"-{_precision}"
    SYSTEMS[f"genai-inplace{_suffix}-kv8"] = (
        "onnxruntime-genai, type decoder, in-place export, int8 KV cache, share buffer on",
        f"inplace-{_precision}-kv8",
    )
    SYSTEMS[f"gptkit-inplace{_suffix}-kv8"] = (
        "gptkit runtime, `--kv-cache inplace --kv-cache-dtype int8` export (shared buffer)",
        f"inplace-{_precision}-kv8",
    )
# llama.cpp's own programs on GGUF conversions of the same weights (only with decode.py
# --llama-cpp DIR, batch 1): system -> (label, file key: the GGUF type). Run by
# _llamacpp.worker, which only their workers import, so the others' cold starts leave it out.
LLAMA_SYSTEMS = {
    "llama-f32": ("llama.cpp llama-completion, GGUF f32 (convert_hf_to_gguf.py)", "gguf-f32"),
    "llama-q8_0": ("llama.cpp llama-completion, GGUF q8_0 (convert_hf_to_gguf.py)", "gguf-q8_0"),
    "llama-q4_0": (
        "llama.cpp llama-completion, GGUF q4_0 (llama-quantize; tied embedding/head q6_K)",
        "gguf-q4_0",
    ),
    "llama-q4_K_M": (
        "llama.cpp llama-completion, GGUF q4_K_M (llama-quantize; tied embedding/head q6_K)",
        "gguf-q4_K_M",
    ),
}
SYSTEMS.update(LLAMA_SYSTEMS)
# gptkit precision -> the llama.cpp row it is compared with
LLAMA_PEER = {"fp32": "llama-f32", "int8": "llama-q8_0", "int4": "llama-q4_0"}
# gptkit system -> onnxruntime-genai on the same file
SAME_FILE_GENAI = {
    "gptkit": "genai",
    "gptkit-inplace": "genai-inplace",
    "gptkit-int8": "genai-int8",
    "gptkit-inplace-int8": "genai-inplace-int8",
    "gptkit-int4": "genai-int4",
    "gptkit-inplace-int4": "genai-inplace-int4",
    "gptkit-inplace-kv8": "genai-inplace-kv8",
    "gptkit-inplace-int8-kv8": "genai-inplace-int8-kv8",
    "gptkit-inplace-int4-kv8": "genai-inplace-int4-kv8",
}
# precision -> gptkit's variants of it (default export first)
GPTKIT_VARIANTS = {
    "fp32": ("gptkit", "gptkit-inplace", "gptkit-inplace-kv8"),
    "int8": ("gptkit-int8", "gptkit-inplace-int8", "gptkit-inplace-int8-kv8"),
    "int4": ("gptkit-int4", "gptkit-inplace-int4", "gptkit-inplace-int4-kv8"),
}
REFERENCE = "torch"  # greedy tokens of every system are compared with this one's


def precision_of(system: str) -> str:
    return ARTIFACTS[SYSTEMS[system][1]][0]


def variant_of(system: str) -> str:
    """Which export a gptkit/genai system runs, in words."""
    _, kv_cache, kv_cache_dtype = ARTIFACTS[SYSTEMS[system][1]]
    if kv_cache != contract.KV_INPLACE:
        return "default export"
    return "in-place export" + (f", {kv_cache_dtype} KV cache" if kv_cache_dtype else "")


@dataclass
class Run:
    """One generation: tokens (batch, n) and perf_counter stamps."""

    tokens: np.ndarray
    start: float
    token_times: list[float]  # when each step's tokens (all rows) were known
    first_token_wall: float  # time.time() at the first token, for cold start

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def total(self) -> float:
        return self.token_times[-1] - self.start

    def step_times(self, skip: int = 1) -> list[float]:
        """Durations of decode steps after the first ``skip`` tokens."""
        t = self.token_times
        return [t[i] - t[i - 1] for i in range(skip, len(t))]


class _Stamps:
    """Collects token timestamps; ``mark()`` once per decode step."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []
        self.first_wall = 0.0

    def mark(self) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) == 1:
            self.first_wall = time.time()

    def run(self, tokens: np.ndarray | list[list[int]]) -> Run:
        return Run(np.asarray(tokens), self.start, self.times, self.first_wall)


class GptkitRuntime:
    """The gptkit runtime: runtime.load() and the decoding loop behind Model.generate()."""

    def __init__(self, path: str, config: dict) -> None:
        import runtime.model

        self.model = runtime.model.load(path, threads=common.THREADS)
        self.api = "runtime.load + Model.generate_tokens (the loop under generate)"

    def cache_mode(self, prompt: np.ndarray) -> str:
        """How the runtime holds this file's KV cache (its session's own flag)."""
        session = getattr(self.model, "_session", None)
        kind = getattr(self.model.metadata, "kv_cache", "?")
        loaded = "; loaded through the graph cache" if getattr(session, "cached", False) else ""
        if getattr(session, "inplace", False):
            return f"{kind}: shared past/present buffer (IO binding){loaded}"
        return f"{kind}: present = past + new{loaded}"

    def generate(self, prompt: np.ndarray, n: int) -> Run:
        rows = prompt.tolist()
        out: list[list[int]] = [[] for _ in rows]
        last = len(rows) - 1
        stamps = _Stamps()
        for row, token in common.runtime_tokens(self.model, rows, n):
            out[row].append(token)
            if row == last:
                stamps.mark()
        return stamps.run(out)


class OrtLoop:
    """A plain numpy + onnxruntime greedy loop: run, feed present.* back as past, argmax."""

    api = "onnxruntime.InferenceSession.run, numpy argmax"

    def __init__(self, path: str, config: dict) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = common.THREADS
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.config = config
        self.past_names = contract.past_names(config["n_layer"])
        self.present_names = contract.present_names(config["n_layer"])

    def generate(self, prompt: np.ndarray, n: int) -> Run:
        c = self.config
        batch, length = prompt.shape
        empty = np.zeros((batch, c["n_head"], 0, c["n_embd"] // c["n_head"]), dtype=np.float32)
        past = [empty] * len(self.past_names)
        stamps = _Stamps()
        ids, tokens = prompt, []
        for step in range(n):
            total = length + step
            seq = ids.shape[1]
            feed = {
                contract.INPUT_IDS: ids,
                contract.ATTENTION_MASK: np.ones((batch, total), dtype=np.int64),
                contract.POSITION_IDS: np.broadcast_to(np.arange(total - seq, total), (batch, seq)),
                **dict(zip(self.past_names, past, strict=True)),
            }
            logits, *past = self.session.run([contract.LOGITS, *self.present_names], feed)
            ids = logits[:, -1, :].argmax(axis=-1)[:, None].astype(np.int64)
            tokens.append(ids[:, 0])
            stamps.mark()
        return stamps.run(np.stack(tokens, axis=1))


class TorchEager:
    """gpt_core's GPT in eager PyTorch, greedy, with its own KV cache."""

    api = "GPT.forward(past_key_values=..., use_cache=True) under torch.inference_mode"

    def __init__(self, weights: str, config: dict) -> None:
        import torch

        from gpt_core.config import GPTConfig
        from gpt_core.model import GPT

        torch.set_num_threads(common.THREADS)
        self.torch = torch
        self.model = GPT(GPTConfig.from_dict(config))
        self.model.load_state_dict(torch.load(weights, weights_only=True))
        self.model.eval()

    def generate(self, prompt: np.ndarray, n: int) -> Run:
        torch = self.torch
        stamps = _Stamps()
        tokens = []
        with torch.inference_mode():
            out = self.model(torch.from_numpy(prompt), use_cache=True)
            for step in range(n):
                next_id = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
                tokens.append(next_id)
                stamps.mark()
                if step < n - 1:
                    out = self.model(next_id, past_key_values=out.past_key_values)
        return stamps.run(torch.cat(tokens, dim=1).numpy())


class HuggingFace:
    """transformers.GPT2LMHeadModel on the same weights (Conv1D layout: linear weights transposed)."""

    api = "GPT2LMHeadModel.generate(do_sample=False, use_cache=True), timed with a streamer"

    def __init__(self, weights: str, config: dict) -> None:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        torch.set_num_threads(common.THREADS)
        self.torch = torch
        eos = config["vocab_size"] - 1
        hf_config = GPT2Config(
            vocab_size=config["vocab_size"],
            n_positions=config["block_size"],
            n_embd=config["n_embd"],
            n_layer=config["n_layer"],
            n_head=config["n_head"],
            activation_function="gelu_new",  # tanh GELU, as gpt_core's
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=1e-5,
            bos_token_id=eos,
            eos_token_id=eos,
            tie_word_embeddings=True,
        )
        self.model = GPT2LMHeadModel(hf_config).eval()
        state = torch.load(weights, weights_only=True)
        conv1d = (
            "attn.c_attn.weight",
            "attn.c_proj.weight",
            "mlp.c_fc.weight",
            "mlp.c_proj.weight",
        )
        state = {k: (v.t().contiguous() if k.endswith(conv1d) else v) for k, v in state.items()}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
        if missing or unexpected:
            raise RuntimeError(
                f"weight mapping: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        self.model.generation_config.eos_token_id = None  # exactly max_new_tokens, like the others
        self.model.generation_config.pad_token_id = eos

    def generate(self, prompt: np.ndarray, n: int) -> Run:
        torch = self.torch
        stamps = _Stamps()

        class Streamer:  # generate() calls put(prompt) once, then put(new tokens) every step
            calls = 0

            def put(self, value) -> None:
                self.calls += 1
                if self.calls > 1:
                    stamps.mark()

            def end(self) -> None:
                pass

        ids = torch.from_numpy(prompt)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                do_sample=False,
                use_cache=True,
                streamer=Streamer(),
            )
        return stamps.run(out[:, prompt.shape[1] :].numpy())


class Genai:
    """onnxruntime-genai over the export, with the genai_config.json written beside it."""

    api = "og.Generator: append_tokens, generate_next_token"

    def __init__(self, path: str, config: dict) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(Path(path).parent))

    def cache_mode(self, prompt: np.ndarray) -> str:
        """Whether genai shares past and present: with a shared buffer present.0.key has
        max_length positions after one decode step, else prompt + 1 (checked, not configured)."""
        og = self.og
        length, extra = prompt.shape[1], 8
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=length + extra, batch_size=1)
        generator = og.Generator(self.model, params)
        generator.append_tokens(prompt[:1].astype(np.int32))
        generator.generate_next_token()
        generator.generate_next_token()  # the first decode forward
        name = contract.PRESENT_KEY.format(0)
        positions = np.asarray(generator.get_output(name)).shape[2]
        if positions == length + extra:
            return f"shared buffer ({name} holds max_length = {positions} positions)"
        return f"present = past + new ({name} holds {positions} positions)"

    def generate(self, prompt: np.ndarray, n: int) -> Run:
        og = self.og
        batch, length = prompt.shape
        params = og.GeneratorParams(self.model)
        params.set_search_options(
            do_sample=False,
            max_length=length + n,
            min_length=length + n,
            batch_size=batch,
        )
        stamps = _Stamps()
        generator = og.Generator(self.model, params)
        generator.append_tokens(prompt.astype(np.int32))  # the prompt's forward pass
        while not generator.is_done():
            generator.generate_next_token()  # choose a token (after the first: one forward first)
            stamps.mark()
        tokens = [generator.get_sequence(b)[length:] for b in range(batch)]
        return stamps.run(np.array(tokens))


def make_system(system: str, manifest: dict):
    """The adapter for ``system`` over the files of one shape's manifest."""
    onnx_path = manifest["exports"][SYSTEMS[system][1]]["path"]
    config = manifest["config"]
    if system.startswith("gptkit"):
        return GptkitRuntime(onnx_path, config)
    if system.startswith("genai"):
        return Genai(onnx_path, config)
    if system == "ortloop":
        return OrtLoop(onnx_path, config)
    if system == "torch":
        return TorchEager(manifest["weights"], config)
    return HuggingFace(manifest["weights"], config)
