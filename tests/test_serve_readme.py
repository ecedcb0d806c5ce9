"""The README's serve section works as written: its curl lines and its openai client example.

Each ``curl`` command of the section is run by bash against a real server (the README's
``localhost:8000`` pointed at the test's port, the model named "model" as in the README).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import LiveServer, live_server, serve_model

from gptkit.server import ServerOptions, create_app
from runtime.engine import Engine

README = Path(__file__).resolve().parent.parent / "README.md"


def _serve_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Serve: `gptkit serve")
    return text[start : text.index("\n## ", start + 1)]


def _curl_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", _serve_section(), flags=re.S):
        joined = block.replace("\\\n", " ")  # continuation lines
        commands += [
            line.strip() for line in joined.splitlines() if line.strip().startswith("curl")
        ]
    return commands


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    path = serve_model(tmp_path_factory)
    app = create_app(lambda: Engine.load(path), ServerOptions(model_name="model"))
    with live_server(app) as live:
        yield live


def test_the_section_shows_curl_lines() -> None:
    assert len(_curl_commands()) >= 4


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("command", _curl_commands())
def test_readme_curl_line_runs(server: LiveServer, command: str) -> None:
    command = command.replace("localhost:8000", f"127.0.0.1:{server.port}")
    done = subprocess.run(
        ["bash", "-c", f"{command} -w '\\n%{{http_code}}'"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    body, status = done.stdout.rsplit("\n", 1)
    assert status == "200", body
    if "data: " in body:  # a stream: JSON chunks, then [DONE]
        events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert all("choices" in json.loads(e) for e in events[:-1])
    else:
        assert json.loads(body)


def test_readme_openai_example_runs(server: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    (source,) = [b for b in re.findall(r"```python\n(.*?)```", _serve_section(), flags=re.S)]
    source = source.replace("http://127.0.0.1:8000", server.url)
    assert server.url in source
    exec(compile(source, f"{README}:serve", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip()
