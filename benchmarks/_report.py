"""The decode benchmark's markdown report (what benchmarks/RESULTS.md holds), from one run's data."""

from __future__ import annotations

import _common as common
from _results import BUSY_WARN, Results, agreement, fmt, load_mark, ratio
from _systems import GPTKIT_VARIANTS, REFERENCE, SAME_FILE_GENAI, SYSTEMS, variant_of
from _targets import targets_section

from runtime import onnx_contract as contract

# int4 exports (export.variants defaults): 4-bit weights plus one fp32 scale per 128-weight block,
# the tied output head in 8-bit blocks.
INT4_BYTES_PER_WEIGHT = 0.5 + 4 / 128
INT4_HEAD_BYTES_PER_WEIGHT = 1 + 4 / 128


def _rounds_text(rounds: int) -> str:
    if rounds <= 1:
        return ""
    return (
        f"; {rounds} rounds of fresh processes, interleaved across systems, each figure from the "
        "round with the median decode speed"
    )


def _spread(result: dict) -> str:
    """ " (min-max over rounds)" after a decode speed measured in several rounds."""
    speeds = [v for v in result.get("round_tok_s", []) if v is not None]
    if len(speeds) < 2:
        return ""
    return f" ({fmt(min(speeds))}-{fmt(max(speeds))})"


class Report(Results):
    """Renders every section: summary, every system, latency, memory, targets, machine, notes."""

    def floor(self, shape: str, batch: int, precision: str) -> float:
        """The bandwidth floor; int4's block MatMul weights and 8-bit head read the bytes above
        (``_common.WeightBytes`` knows fp32 and int8 only)."""
        if precision != "int4":
            return super().floor(shape, batch, precision)
        config = self.data["shapes"][shape]["manifest"]["config"]
        wb = common.weight_bytes(config)
        head = config["vocab_size"] * config["n_embd"]
        per_token = (
            (wb.matmul_params - head) * INT4_BYTES_PER_WEIGHT
            + head * INT4_HEAD_BYTES_PER_WEIGHT
            + wb.other_params * 4
        )
        return batch * self.read_gbs * 1e9 / per_token

    def render(self) -> str:
        d = self.data
        out = [
            "# Decode benchmark results",
            "",
            f"Made by `{d['command']}` on {d['date']} in {d['seconds'] / 60:.1f} min "
            f"(runs per figure: median of {d['plan']['runs']} after 1 warm-up"
            + _rounds_text(d["plan"].get("rounds", 1))
            + ").",
            "",
        ]
        out += self._summary() + self._all_systems() + self._latency() + self._memory()
        out += targets_section(self) + self._machine()
        notes = list(d["notes"])
        busy = [
            f"{shape} b{r['batch']} {r['system']} ({r['other_cpu_cores']:.2f})"
            for shape, block in d["shapes"].items()
            for r in block["results"]
            if r.get("other_cpu_cores", 0.0) > BUSY_WARN
        ]
        if busy:
            notes.append(
                f"**Other processes kept more than {BUSY_WARN} core busy** while these ran (average "
                "cores): " + ", ".join(busy) + ". Their figures are not comparable; rerun them."
            )
        if notes:
            out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
        return "\n".join(out)

    def _summary(self) -> list[str]:
        lines = [
            "## gptkit against each baseline (decode tok/s; ratio = gptkit ÷ baseline)",
            "",
            "| shape | batch | precision | gptkit variant | gptkit tok/s | ÷ genai, same file | "
            "÷ genai, its faster file | ÷ HF generate | ÷ PyTorch eager | ÷ numpy+ORT loop | "
            "floor tok/s | % of floor |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for shape in self.data["shapes"]:
            for batch in self.data["plan"]["batches"]:

                def base(system: str | None) -> float | None:
                    other = self.get(shape, batch, system) if system else None  # noqa: B023
                    return other["decode_tok_s"] if other else None

                for precision, variants in GPTKIT_VARIANTS.items():
                    best = self.best(shape, batch, precision)
                    faster = self.faster_genai(shape, batch, precision)
                    floor = self.floor(shape, batch, precision)
                    for gk in variants:
                        mine = self.get(shape, batch, gk)
                        if mine is None:
                            continue
                        tok = mine["decode_tok_s"]
                        name = variant_of(gk) + (" ★" if gk == best and len(variants) > 1 else "")
                        vs_faster = ratio(tok, base(faster))
                        if faster and vs_faster != "–":
                            vs_faster += f" ({variant_of(faster).split()[0]})"
                        lines.append(
                            f"| {shape} | {batch} | {precision} | {name} | {fmt(tok)} | "
                            f"{ratio(tok, base(SAME_FILE_GENAI[gk]))} | {vs_faster} | "
                            f"{ratio(tok, base('hf'))} | {ratio(tok, base('torch'))} | "
                            f"{ratio(tok, base('ortloop'))} | {fmt(floor)} | "
                            f"{fmt(100 * tok / floor, 0, ' %')} |"
                        )
        lines += [
            "",
            "★ = gptkit's faster variant at that shape, batch and precision (the one the targets "
            "below use). Default export: standard ONNX, the graph concatenates the KV cache every "
            "step. In-place export: `--kv-cache inplace`, ORT GroupQueryAttention writing into one "
            'shared past/present buffer per layer; "int8 KV cache" adds `--kv-cache-dtype int8`. "Same file": onnxruntime-genai on the very file '
            'gptkit ran (share buffer off for the default export, on for the in-place one); "its '
            "faster file\": genai's better figure of the two exports of that precision. HF and "
            "PyTorch run fp32 weights, and the numpy+ORT loop the default fp32 export, so int8, int4 and "
            "in-place rows compare against those fp32 baselines. The floor is bandwidth-only: "
            "batch × read bandwidth ÷ weight bytes per step (at batch 8 the CPU is compute-bound "
            "well before that).",
            "",
        ]
        return lines

    def _all_systems(self) -> list[str]:
        lines = [
            "## Every system",
            "",
            "| shape | batch | system | file | decode tok/s | step ms | TTFT ms | cold start s | "
            "peak RSS MB | greedy = PyTorch | KV cache (checked in the run) | other load |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
        ]
        for shape, block in self.data["shapes"].items():
            for r in block["results"]:
                label, artifact = SYSTEMS[r["system"]]
                name = f"`{r['system']}` {label}"
                file = "weights.pt (fp32)" if r["system"] in ("torch", "hf") else artifact
                if "error" in r:
                    lines.append(
                        f"| {shape} | {r['batch']} | {name} | {file} | error: {r['error'][:150]} ||||||||"
                    )
                    continue
                reference = self.get(shape, r["batch"], REFERENCE)
                lines.append(
                    f"| {shape} | {r['batch']} | {name} | {file} | {fmt(r['decode_tok_s'])}"
                    f"{_spread(r)} | "
                    f"{fmt(r['step_ms'], 2)} | {fmt(r['ttft_ms'])} | {fmt(r['cold_start_s'], 2)} | "
                    f"{fmt(r['peak_rss_mb'], 0)} | {agreement(r, reference)} | "
                    f"{r.get('cache_mode', '–')} | {load_mark(r)} |"
                )
        lines += [
            "",
            "greedy = PyTorch: leading generated tokens identical to PyTorch eager fp32 (worst row of "
            "the batch). Random-init logits are nearly flat, so int8 and int4 rounding flip near-ties early. "
            "KV cache: for gptkit, the runtime session's own flag; for genai, the length of "
            f"{contract.PRESENT_KEY.format(0)} after one decode step (max_length = a shared buffer, prompt + 1 = "
            "concatenated), measured in the worker after the timed runs. Other load: cores kept "
            "busy by anything but the system's own process while it ran (machine busy time from "
            f"/proc/stat minus the worker's CPU time, over its wall time); ⚠ above {BUSY_WARN} "
            "core: that row's timings are suspect, rerun it on a quiet machine.",
            "",
        ]
        return lines

    def _latency(self) -> list[str]:
        lines = [
            "## Per-step decode latency by cache length (batch 1, ms)",
            "",
            "| shape | system | positions | latency ms | last ÷ first |",
            "|---|---|---|---|---:|",
        ]
        for shape, block in self.data["shapes"].items():
            for r in block["results"]:
                probes = r.get("probe_ms")
                if not probes or r["batch"] != 1:
                    continue
                values = list(probes.values())
                lines.append(
                    f"| {shape} | `{r['system']}` | {' / '.join(probes)} | "
                    f"{' / '.join(fmt(v, 2) for v in values)} | {values[-1] / values[0]:.2f}× |"
                )
        lines += [
            "",
            f"Each figure: median duration of decode steps 2–{common.PROBE_NEW_TOKENS} after a prompt of that "
            "many random tokens (so the cache holds about that many positions).",
            "",
        ]
        return lines

    def _memory(self) -> list[str]:
        lines = [
            "## gptkit cold start and memory (batch 1)",
            "",
            "| shape | precision | variant | file MB | cold start s (fresh processes) | load s | "
            "peak RSS MB | RSS − file MB (both in 2²⁰ B) | peak RSS MB, full-context prompt |",
            "|---|---|---|---:|---|---:|---:|---:|---:|",
        ]
        for shape, block in self.data["shapes"].items():
            exports = block["manifest"]["exports"]
            for precision, variants in GPTKIT_VARIANTS.items():
                for system in variants:
                    r = self.get(shape, 1, system)
                    if r is None:
                        continue
                    size = exports[SYSTEMS[system][1]]["megabytes"]
                    samples = r.get("cold_start_samples", [r["cold_start_s"]])
                    lines.append(
                        f"| {shape} | {precision} | {variant_of(system)} | {fmt(size)} | "
                        f"{fmt(r['cold_start_s'], 2)} "
                        f"(samples {', '.join(f'{s:.2f}' for s in samples)}) | "
                        f"{fmt(r['load_s'], 2)} | {fmt(r['peak_rss_mb'], 0)} | "
                        f"{fmt(r['peak_rss_mb'] - size * 1e6 / 2**20, 0)} | "
                        f"{fmt(r.get('peak_rss_full_context_mb'), 0)} |"
                    )
        lines += [
            "",
            "Cold start: new Python process to first token (interpreter, imports, session creation, "
            "prefill). load s: imports + runtime.load. File MB = the weights' bytes on disk (MB = 10⁶ B; "
            "RSS MB = 2²⁰ B). Peak RSS is the 32 + 128-token workload's; the last column is the peak "
            "after the latency probes, whose longest prompt nearly fills the context (its prefill "
            "returns logits for every position).",
            "",
        ]
        return lines

    def _machine(self) -> list[str]:
        d = self.data
        m = d["machine"]
        bw = d["bandwidth"]
        versions = " · ".join(f"{k} {v}" for k, v in m["versions"].items())
        lines = [
            "## Machine and versions",
            "",
            f"- CPU: {m['cpu']} ({m['simd']}), {m['cores']} cores, {m['memory_gb']} GB RAM; "
            f"Python {m['python']}; {m['platform']}",
            f"- load average (1, 5, 15 min) at start: {' '.join(f'{x:.2f}' for x in m['load_avg'])}; "
            f"at the end: {' '.join(f'{x:.2f}' for x in d['load_avg_end'])} (the benchmark's own "
            "2 threads account for up to 2 of it)",
            f"- memory bandwidth (numpy, 512 MB arrays, best of 7): read {bw['sum_2t']:.1f} GB/s with 2 "
            f"threads ({bw['sum_1t']:.1f} with 1); copy {bw['copy_2t']:.1f} GB/s read+write with 2 threads "
            f"({bw['copy_1t']:.1f} with 1). The floor uses the 2-thread read figure.",
            f"- fp32 GEMM (numpy 2048³, {common.THREADS} threads): {d['gemm_gflops']:.0f} GFLOP/s",
            f"- versions: {versions}",
            f"- threads: {common.THREADS} intra-op everywhere (ORT session options, torch.set_num_threads, "
            "genai_config session_options, OMP/MKL/OPENBLAS_NUM_THREADS)",
            "",
            "Weights and exports:",
            "",
            "| shape | config | params | bytes read per step fp32 / int8 | exports (MB on disk) |",
            "|---|---|---:|---|---|",
        ]
        for shape, block in d["shapes"].items():
            man = block["manifest"]
            c = man["config"]
            wb = common.weight_bytes(c)
            exported = ", ".join(
                f"{name} {ex['megabytes']} MB" for name, ex in man["exports"].items()
            )
            lines.append(
                f"| {shape} | L{c['n_layer']} H{c['n_head']} C{c['n_embd']} V{c['vocab_size']} "
                f"block {c['block_size']} | {man['n_params'] / 1e6:.2f} M | "
                f"{wb.per_token('fp32') / 1e6:.1f} / {wb.per_token('int8') / 1e6:.1f} MB | "
                f"{exported} |"
            )
        lines += [
            "",
            "Every file is made by gptkit's own `export.onnx_export.export_onnx` from the same "
            "weights: fp32, int8 and int4 are the default export (`ExportOptions(quantize=...)`), "
            f'the inplace-* ones add `kv_cache="{contract.KV_INPLACE}"` and the *-kv8 ones '
            '`kv_cache_dtype="int8"`. Each directory has its own '
            "genai_config.json (past_present_share_buffer false for the default export, true for "
            "the in-place one).",
            "",
            f"tiny and small-cpu are built with block_size {common.MIN_BLOCK_SIZE} (presets: 64 and 128) "
            "so the 32 + 128 tokens fit in the context; nothing else differs from the presets (dropout 0).",
            "",
        ]
        return lines
