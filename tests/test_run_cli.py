"""`gptkit run` through click's CliRunner: streams, pipes, interactive loop, one-line errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from reliability_helpers import one_line_error
from runtime_helpers import Exported, prebuilt_or_tiny

import runtime
from gptkit.cli import cli
from gptkit.run_cmd import run_command

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return prebuilt_or_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def model(exported: Exported) -> runtime.Model:
    return runtime.load(exported.path, threads=1)


@pytest.fixture
def run(runner: CliRunner) -> Callable[..., Result]:
    """``gptkit run ARGS`` through the shared CliRunner."""
    return lambda *args, input=None: runner.invoke(cli, ["run", *args], input=input)


def test_greedy_output_is_the_continuation_only(run, exported: Exported, model: runtime.Model):
    result = run(
        "--model", str(exported.path), "--prompt", "ROMEO:", "-t", "0", "-n", "12", "--threads", "1"
    )
    assert result.exit_code == 0, result.output
    expected = model.generate("ROMEO:", max_new_tokens=12, temperature=0)
    assert result.stdout == expected + "\n"
    assert "tokens in" in result.stderr and "tok/s" in result.stderr


def test_echo_prints_the_prompt_first_and_stdin_is_read_with_dash(
    run, exported: Exported, model: runtime.Model
):
    text = "To be, or not to be"
    result = run("-m", str(exported.path), "-p", "-", "--echo", "-t", "0", "-n", "8", input=text)
    assert result.exit_code == 0, result.output
    assert result.stdout == text + model.generate(text, max_new_tokens=8, temperature=0) + "\n"


def test_seed_makes_sampling_reproducible_and_stop_cuts(run, exported: Exported):
    args = (
        "-m",
        str(exported.path),
        "-p",
        "ROMEO:",
        "-n",
        "20",
        "--seed",
        "5",
        "--temperature",
        "1.0",
    )
    first, second = run(*args), run(*args)
    assert first.exit_code == 0 and first.stdout == second.stdout
    text = first.stdout[:-1]
    if len(text.strip()) < 3:
        pytest.skip("the sample is too short to take a stop string from")
    stop = text.strip()[1:3]
    cut = run(*args, "--stop", stop)
    assert cut.exit_code == 0
    assert cut.stdout == text[: text.index(stop)] + "\n"
    assert "; stop]" in cut.stderr


def test_empty_prompt_is_not_an_error(run, exported: Exported):
    result = run("-m", str(exported.path), "-p", "", "-n", "5", "--seed", "0")
    assert result.exit_code == 0, result.output


def test_default_length_fits_a_small_context(run, exported: Exported, model: runtime.Model):
    """Without -n, `gptkit run` generates 200 tokens or what fits, never a context error."""
    result = run("-m", str(exported.path), "-p", "ROMEO:", "-t", "0", "--threads", "1")
    assert result.exit_code == 0, result.output
    n = min(200, model.block_size - len(model.tokenizer.encode("ROMEO:")))
    expected = model.complete("ROMEO:", max_new_tokens=n, temperature=0)
    assert result.stdout == expected.text + "\n"


def test_the_pipeline_invocation_from_the_cli_group_works(runner: CliRunner, exported: Exported):
    """gptkit with no command ends with ctx.invoke(run_command, prompt=..., model=...)."""

    @click.command()
    @click.pass_context
    def chain(ctx: click.Context) -> None:
        ctx.invoke(run_command, prompt="ROMEO:", model=str(exported.path))

    result = runner.invoke(chain, [])
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n") and "tokens in" in result.stderr


def test_interactive_loop_reads_prompts_until_eof(run, exported: Exported, model: runtime.Model):
    result = run("-m", str(exported.path), "-t", "0", "-n", "6", input="ROMEO:\nJULIET:\n")
    assert result.exit_code == 0, result.output
    expected = [
        model.generate(p, max_new_tokens=6, temperature=0) + "\n" for p in ("ROMEO:", "JULIET:")
    ]
    assert result.stdout == "".join(expected)
    assert result.stderr.count("tokens in") == 2


def test_interactive_loop_survives_a_bad_prompt(run, exported: Exported, model: runtime.Model):
    too_long = "ROMEO: " * model.block_size
    result = run("-m", str(exported.path), "-t", "0", "-n", "6", input=f"{too_long}\nROMEO:\n")
    assert result.exit_code == 0, result.output
    assert "Error: " in result.stderr and "context" in result.stderr
    assert result.stderr.count("tokens in") == 1


def test_ctrl_c_while_streaming_keeps_the_output_so_far(run, exported: Exported, monkeypatch):
    import runtime.generation

    real = runtime.generation.choose_token
    calls = []

    def interrupt_on_sixth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime.generation, "choose_token", interrupt_on_sixth)
    result = run("-m", str(exported.path), "-p", "ROMEO:", "-t", "0", "-n", "20", "--stop", "zzzz")
    assert result.exit_code == 130
    assert "interrupted" in result.stderr and "[5 tokens" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--top-k", "-3"], "top_k must be >= 0"),
        (["--min-p", "2"], "min_p must be in [0, 1]"),
        (["--repetition-penalty", "0"], "repetition_penalty must be > 0"),
        (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["--threads", "0"], "threads must be positive"),
        (["--device", "tpu"], "unknown device"),
        (["--max-new-tokens", "100000"], "over the model's context of"),
    ],
)
def test_invalid_values_are_one_line_errors(run, exported: Exported, args: list[str], needle: str):
    one_line_error(run("-m", str(exported.path), "-p", "ROMEO:", *args), needle, only=True)


def test_missing_file(run, tmp_path: Path):
    result = run("-m", str(tmp_path / "nope.onnx"), "-p", "x")
    one_line_error(result, "not found", "gptkit export", only=True)


def test_not_an_onnx_file(run, tmp_path: Path):
    path = tmp_path / "notes.onnx"
    path.write_text("hello")
    one_line_error(run("-m", str(path), "-p", "x"), "not a readable ONNX model", only=True)


def test_onnx_without_gptkit_metadata(run, exported: Exported, tmp_path: Path):
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(exported.path))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    result = run("-m", str(tmp_path / "bare.onnx"), "-p", "x")
    one_line_error(result, "no gptkit metadata", only=True)


def test_cuda_without_onnxruntime_gpu(run, exported: Exported):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    result = run("-m", str(exported.path), "-p", "x", "--device", "cuda")
    one_line_error(result, "onnxruntime-gpu", only=True)


def test_usage_errors_exit_2(run, exported: Exported):
    result = run("-m", str(exported.path), "-p", "x", "--top-k", "many")
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_gptkit_run_works_with_torch_unimportable(exported: Exported):
    """The shipped path: a subprocess where `import torch` fails still runs `gptkit run`."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        from gptkit.cli import main
        sys.argv = ["gptkit", "run", "-m", {str(exported.path)!r}, "-p", "ROMEO:", "-n", "5", "-t", "0"]
        main()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "tokens in" in result.stderr
