"""Complete every line of standard input with an exported model, a batch at a time.

    printf 'ROMEO:\nJULIET:\n' | python examples/complete_lines.py --model model.onnx -n 20

Each input line becomes one output line: the line, a tab, then its continuation (newlines in the
continuation are shown as "\\n", so the output stays one record per line). Lines are generated
in batches (left-padded, one forward pass per step for the whole batch, each row stopping on its
own), which is faster per line than one at a time. Needs only `pip install gptkit`.
"""

from __future__ import annotations

import argparse
import sys

import runtime


def complete_lines(model: runtime.Model, lines: list[str], *, batch: int, **options) -> list[str]:
    """The continuation of each line, generated ``batch`` lines at a time."""
    out: list[str] = []
    for start in range(0, len(lines), batch):
        out.extend(model.generate(lines[start : start + batch], **options))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model.onnx", help="exported .onnx file")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=30)
    parser.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--batch", type=int, default=8, help="lines per forward pass")
    args = parser.parse_args()
    lines = [line.rstrip("\r\n") for line in sys.stdin]
    try:
        model = runtime.load(args.model)
        completions = complete_lines(
            model,
            lines,
            batch=max(1, args.batch),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            stop=["\n\n"],
        )
    except runtime.GptkitError as e:
        raise SystemExit(f"Error: {e}") from None
    for line, completion in zip(lines, completions, strict=True):
        print(line, completion.replace("\n", "\\n"), sep="\t")


if __name__ == "__main__":
    main()
