"""Compare weight-init schemes: the validation loss each reaches with the same data, seed and steps.

    python examples/init_schemes.py            # 150 steps per scheme, a few minutes on 2 cores
    python examples/init_schemes.py 40         # a quicker look

Schemes (see gpt_core.model.init_weights): gpt2 = N(0, 0.02) with scaled residual projections;
neox = "small init" plus Wang's residual init; xavier = Glorot-uniform. Deeper-than-wide models
show the differences best, so the model here is 6 layers of 128.
"""

from __future__ import annotations

import sys
import tempfile

from gpt_core.config import INIT_SCHEMES, GPTConfig
from gpt_core.train import TrainConfig, train


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 150
    results = {}
    for scheme in INIT_SCHEMES:
        model_config = GPTConfig.preset(
            "small-cpu", n_layer=6, n_head=4, n_embd=128, dropout=0.0, init=scheme
        )
        with tempfile.TemporaryDirectory() as out:
            config = TrainConfig(
                out_dir=out, vocab_size=1024, max_steps=steps, eval_interval=steps, seed=1
            )
            result = train(model_config, config)
        results[scheme] = result
        print(
            f"{scheme:>7}: val loss {result.best_val_loss:.3f} nats/token, "
            f"{result.best_val_bpc:.3f} bits/char",
            flush=True,
        )
    best = min(results, key=lambda s: results[s].best_val_loss)
    print(f"best after {steps} steps: {best}")


if __name__ == "__main__":
    main()
