"""What makes a start and a decode step cheaper keeps the runtime's behaviour.

The metadata read without onnxruntime equals what the session reports, the bulk tokenizer-rank
parser equals the line-by-line one (errors included), the CLI imports a command's module only
when it is used, and the batched greedy pick equals choose_token row by row, NaN and inf too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from runtime_helpers import export_tiny, prebuilt_or_tiny

from runtime import tokenizer as tokenizer_module
from runtime.errors import TokenizerError
from runtime.generation import _greedy_picks
from runtime.metadata import read_props
from runtime.sampling import SamplingConfig, choose_token
from runtime.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prebuilt_or_tiny(tmp_path_factory).path


def test_read_props_equals_the_sessions_metadata(exported: Path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert read_props(exported) == session.get_modelmeta().custom_metadata_map


def test_read_props_gives_none_for_what_is_not_onnx(tmp_path: Path) -> None:
    for name, data in [("empty", b""), ("text", b"not a model\n"), ("cut", b"\x3a\xff\xff")]:
        path = tmp_path / name
        path.write_bytes(data)
        assert read_props(path) in (None, {}), name
    assert read_props(tmp_path / "missing.onnx") is None


def test_loading_a_damaged_or_foreign_file_still_says_why(tmp_path: Path) -> None:
    import runtime
    from runtime.errors import ModelFileError

    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a model\n")
    with pytest.raises(ModelFileError, match="is not a readable ONNX model"):
        runtime.load(path)


def _slow_parse(text: str) -> dict[bytes, int]:
    """The line-by-line parser alone (what _parse_ranks falls back to)."""
    return tokenizer_module._parse_ranks("\n" + text)  # a leading blank line: never canonical


def test_bulk_rank_parsing_equals_the_line_loop() -> None:
    ranks = {bytes([i]): i for i in range(256)} | {b"th": 256, b"the": 257, b" \xe2\x82": 258}
    text = tokenizer_module._dump_ranks(ranks)
    assert tokenizer_module._CANONICAL_RANKS.fullmatch(text)
    parsed = tokenizer_module._parse_ranks(text)
    assert parsed == _slow_parse(text) == ranks
    assert list(parsed) == list(_slow_parse(text))  # the same order too


@pytest.mark.parametrize(
    "text, line",
    [
        ("QQ== 1\nQg== x\n", 2),  # not canonical: the loop finds the line
        ("QQ== 1 2\n", 1),
        ("Q!== 1\n", 1),
        ("QQ==QQ== 1\n", 1),  # canonical in shape, bad base64: the loop says where
        ("QQ 1\n", 1),  # missing padding
    ],
)
def test_bad_ranks_name_their_line(text: str, line: int) -> None:
    with pytest.raises(TokenizerError, match=f"line {line}"):
        tokenizer_module._parse_ranks(text)


def test_a_tokenizer_round_trips_through_the_bulk_parser() -> None:
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, name="bytes")
    again = Tokenizer.from_bytes(tok.to_bytes())
    assert again == tok
    assert again.decode(again.encode("héllo 😀")) == "héllo 😀"


def test_stream_decoder_checks_ids_and_joins_characters() -> None:
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, name="bytes")
    decoder = tok.stream_decoder()
    text = "".join(decoder.add(b) for b in "é😀".encode()) + decoder.flush()
    assert text == "é😀"
    with pytest.raises(TokenizerError):
        decoder.add(tok.n_vocab)


def test_gptkit_run_imports_only_its_own_command() -> None:
    code = textwrap.dedent(
        """
        import json, sys
        from gptkit.cli import cli
        import click

        before = sorted(m for m in sys.modules if m.startswith("gptkit."))
        names = sorted(cli.commands)
        ctx = click.Context(cli, info_name="gptkit")
        run = cli.get_command(ctx, "run")
        after = sorted(m for m in sys.modules if m.startswith("gptkit."))
        print(json.dumps({"before": before, "names": names, "run": run.name, "after": after,
                          "unknown": cli.get_command(ctx, "nope") is None}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["before"] == ["gptkit.cli"]
    assert report["names"] == ["export", "inspect", "run", "serve", "train"]
    assert report["run"] == "run" and report["unknown"]
    assert report["after"] == ["gptkit.cli", "gptkit.run_cmd"]


def test_batched_greedy_pick_equals_choose_token_per_row() -> None:
    rng = np.random.default_rng(0)
    n_vocab = 40
    logits = rng.normal(size=(7, 48)).astype(np.float32)  # 8 padded ids past the tokenizer
    logits[1, 45] = 1e9  # past n_vocab: never chosen
    logits[2, 3] = np.nan
    logits[3, 5] = np.inf
    logits[4, :] = -np.inf
    logits[5, 7] = logits[5, 9] = logits[5].max() + 1  # a tie: the first
    logits[6, 0] = np.nan
    logits[6, 1] = np.inf
    cfg = SamplingConfig(temperature=0)
    picks = _greedy_picks(logits, n_vocab)
    for b in range(len(logits)):
        alone = choose_token(logits[b], cfg, np.random.default_rng(b), n_vocab=n_vocab)
        batched = choose_token(
            logits[b], cfg, np.random.default_rng(b), n_vocab=n_vocab, argmax=picks[b]
        )
        assert batched == alone, b
    assert picks[2] is None and picks[3] is None and picks[4] is None and picks[6] is None


def test_in_place_steps_without_the_logits_copy_give_the_same_tokens(tmp_path: Path) -> None:
    """The loop reads each step's logits from the cache's buffer: the same greedy tokens as
    stepping through run() with a copy, batch 1 and 3, a row stopping early included."""
    pytest.importorskip("torch")
    import runtime

    path = export_tiny(tmp_path, kv_cache="inplace").path
    model = runtime.load(path)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    for rows in (prompts[:1], prompts):
        fast = [
            (t.row, t.id) for t in model.generate_tokens(rows, max_new_tokens=12, temperature=0)
        ]
        reference = _reference_greedy(model, rows, 12)
        assert fast == reference


def _reference_greedy(model, rows: list[list[int]], n: int) -> list[tuple[int, int]]:
    """Greedy tokens stepped by hand through OnnxSession.run (logits copied), left padding."""
    session = model._session
    eot = model.tokenizer.eot_token
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = row
        mask[b, width - len(row) :] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    cache = session.empty_cache(len(rows), capacity=width + n)
    logits, cache = session.run(ids, mask, positions, cache)
    logits = logits[:, -1, :]
    done = [False] * len(rows)
    out = []
    n_vocab = model.tokenizer.n_vocab
    for step in range(n):
        chosen = np.zeros(len(rows), dtype=np.int64)
        for b in range(len(rows)):
            if done[b]:
                continue
            token = int(np.argmax(logits[b, :n_vocab]))
            chosen[b] = token
            out.append((b, token))
            done[b] = token == eot
        if step == n - 1 or all(done):
            break
        new = (~np.array(done)).astype(np.int64)[:, None]
        mask = np.concatenate([mask, new], axis=1)
        positions = (mask.sum(axis=1, keepdims=True) - 1) * new
        logits, cache = session.run(chosen[:, None], mask, positions, cache)
        logits = logits[:, -1, :]
    return out
