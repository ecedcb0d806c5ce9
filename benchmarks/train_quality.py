"""Text quality per minute: validation bits/char against wall-clock time for training recipes.

    .venv/bin/python benchmarks/train_quality.py                      # default x2 seeds, previous
    .venv/bin/python benchmarks/train_quality.py --recipes default --seeds 1 --budget-min 3
    .venv/bin/python benchmarks/train_quality.py --list               # the named recipes

Each run is a fresh ``gptkit train`` process on the bundled Tiny Shakespeare, exactly as a user
starts it, with the recipe's flags and a seed. A run still going at the budget gets a Ctrl-C
(SIGINT): gptkit finishes the step, evaluates and saves, as it does for a user. Validation
bits/char come from the run's own evaluations (metrics.jsonl), timed by its training clock
(``elapsed_s``: the steps and the evaluations, not the one-off tokenizer and data setup, which the
table gives separately as "setup s"). Writes benchmarks/TRAINING.md (the table, the machine, the
spread between seeds, samples from the default run) and benchmarks/training_curve.png.

Run it on a quiet machine (load average well under 1): the budget is wall clock, and a
neighbour's load costs a run steps. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import machine_info  # noqa: E402

# The recipe `gptkit train` used before issue 16 (AdamW, cosine, fp32, 600 steps), spelled out
# field by field so it stays reproducible whatever the defaults become.
PREVIOUS = {
    "optimizer": "adamw",
    "lr": 2e-3,
    "lr_schedule": "cosine",
    "precision": "fp32",
    "max_steps": 600,
    "batch_size": 32,
    "vocab_size": 2048,
    "warmup_steps": 50,
    "weight_decay": 0.1,
    "eval_interval": 100,
    "eval_windows": 512,
    "dropout": 0.1,
}


@dataclass
class Recipe:
    about: str
    fields: dict[str, Any] = field(default_factory=dict)  # a --config JSON (model and train)


RECIPES = {
    "default": Recipe("`gptkit train` as shipped"),
    "previous": Recipe("the recipe before issue 16: AdamW, cosine, fp32, 600 steps", PREVIOUS),
    "default-fp32": Recipe("the default with `--precision fp32`", {"precision": "fp32"}),
    "default-adamw": Recipe(
        "the default with `--optimizer adamw`", {"optimizer": "adamw", "lr": 2e-3}
    ),
}

STOP_GRACE_S = 120  # after the budget's Ctrl-C: time to evaluate, save and exit


@dataclass
class Run:
    recipe: str
    seed: int
    evals: list[dict[str, Any]]  # metrics.jsonl rows with val_bpc
    steps: int
    wall_s: float  # process start to exit
    train_s: float  # the run's training clock at its last row
    finished: bool  # ended on its own (not stopped at the budget)
    samples: list[tuple[int, float, str]]  # (step, minutes, text) per evaluation

    @property
    def setup_s(self) -> float:
        return max(0.0, self.wall_s - self.train_s)

    def best(self) -> float:
        return float(min(r["val_bpc"] for r in self.evals))

    def bpc_by(self, seconds: float) -> float | None:
        """The best validation bits/char evaluated within ``seconds`` of training clock."""
        seen = [r["val_bpc"] for r in self.evals if r["elapsed_s"] <= seconds]
        return min(seen) if seen else None

    def minutes_to(self, bpc: float) -> float | None:
        hits = [r["elapsed_s"] for r in self.evals if r["val_bpc"] <= bpc]
        return min(hits) / 60 if hits else None


def run_recipe(name: str, seed: int, budget_s: float, work: Path) -> Run:
    recipe = RECIPES[name]
    out = work / f"{name}-seed{seed}"
    config = work / f"{name}.json"
    config.write_text(json.dumps(recipe.fields))
    command = [sys.executable, "-m", "gptkit", "train", "--out", str(out), "--seed", str(seed)]
    command += ["--config", str(config)]
    log = (work / f"{name}-seed{seed}.log").open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    finished = True
    try:
        process.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        finished = False
        process.send_signal(signal.SIGINT)
        process.wait(timeout=STOP_GRACE_S)
    wall = time.perf_counter() - started
    log.close()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_bpc" in r]
    text = (work / f"{name}-seed{seed}.log").read_text(errors="replace")
    return Run(
        name,
        seed,
        evals,
        rows[-1]["step"],
        wall,
        rows[-1]["elapsed_s"],
        finished,
        _samples(text),
    )


_EVAL_LINE = re.compile(
    r"^step (\d+): [^\n]* at (\d+):(\d\d)\n--- sample ---\n(.*?)\n-{14}$", re.M | re.S
)


def _samples(log: str) -> list[tuple[int, float, str]]:
    """(step, minutes, sample) from gptkit train's evaluation lines."""
    found = []
    for m in _EVAL_LINE.finditer(log.replace("\r", "\n")):
        step, minutes = int(m.group(1)), int(m.group(2)) + int(m.group(3)) / 60
        found.append((step, minutes, m.group(4)))
    return found


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        ax.plot(
            [r["elapsed_s"] / 60 for r in run.evals],
            [r["val_bpc"] for r in run.evals],
            "o-",
            markersize=3,
            label=f"{run.recipe} (seed {run.seed})",
        )
    for target, minutes in ((2.40, 3), (2.10, 10)):
        ax.axhline(target, color="grey", linewidth=0.6, linestyle="--")
        ax.axvline(minutes, color="grey", linewidth=0.6, linestyle="--")
    ax.set_ylim(top=min(3.5, ax.get_ylim()[1]))
    ax.set_xlabel("minutes of training (wall clock, evaluations included)")
    ax.set_ylabel("validation bits per character")
    ax.set_title("Tiny Shakespeare, `gptkit train` recipes on this machine")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _native_bf16() -> str:
    """The CPU flags that make `--precision auto` pick bf16 (gpt_core.schedule), or "no"."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(found) or "no"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(runs: list[Run], budget_s: float, machine: dict[str, Any], png: Path) -> str:
    lines = [
        "# Training quality per minute",
        "",
        "Written by `benchmarks/train_quality.py` (see its docstring for how to run it). Each "
        "row is one fresh `gptkit train` process on the bundled Tiny Shakespeare with a "
        f"wall-clock budget of {budget_s / 60:.0f} minutes; validation bits/char are the run's "
        "own evaluations, at the run's training clock (steps and evaluations; the one-off "
        'tokenizer and data setup is the "setup s" column). Goal (issue 16): <= 2.40 bits/char '
        "within 3 minutes and <= 2.10 within 10.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['simd']}), "
        f"{machine['memory_gb']} GB; bf16 in hardware: {_native_bf16()}; "
        f"torch {machine['versions']['torch']}; load average at the start "
        + (
            " ".join(f"{x:.2f}" for x in machine["load_avg"])
            if machine["load_avg"]
            else "not recorded (the runs had the machine to themselves)"
        )
        + ".",
        "",
        "| recipe | seed | steps | ended | best bits/char | by 3 min | by 10 min | "
        "min to 2.40 | min to 2.10 | train min | setup s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run.recipe} | {run.seed} | {run.steps} | "
            f"{'finished' if run.finished else 'budget'} | {run.best():.4f} | "
            f"{_fmt(run.bpc_by(180))} | {_fmt(run.bpc_by(600))} | "
            f"{_fmt(run.minutes_to(2.40), 1)} | {_fmt(run.minutes_to(2.10), 1)} | "
            f"{run.train_s / 60:.1f} | {run.setup_s:.0f} |"
        )
    lines += ["", "Recipes:", ""]
    for name in dict.fromkeys(r.recipe for r in runs):
        recipe = RECIPES[name]
        flags = json.dumps(recipe.fields) if recipe.fields else "no flags"
        lines.append(f"- **{name}**: {recipe.about} ({flags}).")
    by_recipe: dict[str, list[Run]] = {}
    for run in runs:
        by_recipe.setdefault(run.recipe, []).append(run)
    spread = [
        f"{name}: best {min(r.best() for r in rs):.3f}-{max(r.best() for r in rs):.3f} "
        f"over seeds {', '.join(str(r.seed) for r in rs)}"
        for name, rs in by_recipe.items()
        if len(rs) > 1
    ]
    if spread:
        lines += ["", "Run-to-run spread: " + "; ".join(spread) + "."]
    lines += ["", f"![validation bits/char against minutes]({png.name})", ""]
    default = by_recipe.get("default", [None])[0]
    if default is not None and default.samples:
        picks = [default.samples[0], default.samples[len(default.samples) // 2]]
        picks.append(default.samples[-1])
        lines += [f"## Samples from the default run (seed {default.seed})", ""]
        for step, minutes, text in dict.fromkeys(picks):
            bpc = next((r["val_bpc"] for r in default.evals if r["step"] == step), None)
            lines += [
                f"Step {step}, {minutes:.1f} min, {_fmt(bpc)} bits/char:",
                "",
                "```text",
                text.strip("\n"),
                "```",
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="default,previous", help="comma-separated names")
    parser.add_argument("--seeds", type=int, default=2, help="seeds for the default recipe")
    parser.add_argument("--budget-min", type=float, default=10.0, help="minutes per run")
    parser.add_argument("--out", type=Path, default=HERE / "TRAINING.md")
    parser.add_argument("--work-dir", type=Path, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--list", action="store_true", help="list the recipes and exit")
    parser.add_argument(
        "--render", type=Path, metavar="WORK_DIR", help="write the report of a kept run again"
    )
    args = parser.parse_args(argv)
    if args.list:
        for name, recipe in RECIPES.items():
            print(f"{name}: {recipe.about} {json.dumps(recipe.fields)}")
        return
    if args.render:
        saved = json.loads((args.render / "runs.json").read_text())
        if isinstance(saved, list):  # written before the budget and machine were kept
            machine = {**machine_info(), "load_avg": None}
            saved = {"budget_s": args.budget_min * 60, "machine": machine, "runs": saved}
        runs = [Run(**r) for r in saved["runs"]]
        for run in runs:  # samples again from the logs, as this version parses them
            log = args.render / f"{run.recipe}-seed{run.seed}.log"
            run.samples = _samples(log.read_text(errors="replace"))
        write(runs, saved["budget_s"], saved["machine"], args.out)
        return
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; see --list")
    machine = machine_info()
    budget_s = args.budget_min * 60
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gptkit-train-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for name in names:
        for seed in range(1337, 1337 + (args.seeds if name == "default" else 1)):
            print(f"{name} seed {seed}: up to {args.budget_min:g} min ...", flush=True)
            run = run_recipe(name, seed, budget_s, work)
            print(
                f"  best {run.best():.3f} bits/char, {run.steps} steps, "
                f"{run.train_s / 60:.1f} min training + {run.setup_s:.0f} s setup",
                flush=True,
            )
            runs.append(run)
    saved = {"budget_s": budget_s, "machine": machine, "runs": [r.__dict__ for r in runs]}
    (work / "runs.json").write_text(json.dumps(saved, indent=1))
    write(runs, budget_s, machine, args.out)
    print(f"runs kept in {work} (--render {work} writes the report again)")


def write(runs: list[Run], budget_s: float, machine: dict[str, Any], out: Path) -> None:
    png = out.with_name("training_curve.png")
    plot(runs, png)
    out.write_text(report(runs, budget_s, machine, png))
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
