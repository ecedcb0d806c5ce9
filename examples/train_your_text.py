"""Train a small GPT on your own text through the Python API, then generate from it.

    python examples/train_your_text.py my_notes.txt            # a file, or a directory of .txt
    python examples/train_your_text.py                         # the bundled Tiny Shakespeare

The run is saved to runs/my-text (best/ and last/); `gptkit export --checkpoint runs/my-text`
turns it into an ONNX file. The same settings as `gptkit train`, minus the progress bar.
"""

from __future__ import annotations

import sys

import torch

from gpt_core.checkpoint import load_model
from gpt_core.config import GPTConfig
from gpt_core.train import Event, TrainConfig, train


def report(event: Event) -> None:
    """The library never prints; a callback decides what to show."""
    if event.kind == "eval":
        d = event.data
        print(f"step {event.step}/{event.total_steps}: val {d['val_bpc']:.3f} bits/char")
        print("   ", d["sample"][:200].replace("\n", "\n    "))


def main() -> None:
    model_config = GPTConfig.preset("small-cpu", n_layer=2)  # a little smaller: a quick demo
    config = TrainConfig(
        data=sys.argv[1:],  # empty: the bundled corpus
        out_dir="runs/my-text",
        vocab_size=1024,
        max_steps=200,
        eval_interval=50,
    )
    result = train(model_config, config, callback=report)
    print(f"saved to {result.run_dir}; best {result.best_val_bpc:.3f} bits/char")

    model, tokenizer = load_model(result.run_dir)  # the best checkpoint, as export would load it
    prompt = torch.tensor([tokenizer.encode("ROMEO:")])
    out = model.generate(prompt, 80, temperature=0.8, top_k=50)
    print(tokenizer.decode(out[0].tolist()))


if __name__ == "__main__":
    main()
