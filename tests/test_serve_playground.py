"""The web playground at ``GET /``, driven in a real headless Chromium against a real server.

``gptkit serve`` runs as a subprocess on a free loopback port with an API key, serving a tiny
in-place export; Playwright drives Debian's ``chromium`` package (``/usr/bin/chromium``; CI's
``.ci/run`` installs it). Playwright's own browser downloads are never used. Without the binary
or the ``playwright`` package the module is skipped, saying which is missing (or fails,
where ``GPTKIT_REQUIRE_BROWSER`` is set, as in CI).

The tiny model gets an 8,192-position context here (``export_tiny``'s model otherwise): its 64
positions stream out in tens of milliseconds, before a click on Stop could land, while thousands
of tokens give Stop a generation to cancel.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
from runtime_helpers import export_tiny
from serve_helpers import metric

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _missing(reason: str) -> NoReturn:
    """Skip the module, or fail it where CI sets GPTKIT_REQUIRE_BROWSER (a skip would hide it)."""
    if os.environ.get("GPTKIT_REQUIRE_BROWSER"):
        pytest.fail(f"GPTKIT_REQUIRE_BROWSER is set but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


if not CHROMIUM.exists():
    _missing(f"{CHROMIUM} not found (Debian: apt-get install chromium; .ci/run installs it)")
try:
    from playwright import sync_api
except ImportError:
    _missing("playwright not installed (pip install -e '.[dev]')")

pytestmark = [pytest.mark.torch, pytest.mark.slow]

API_KEY = "playground-test-key"
CONTEXT = 8192
PROMPT = "ROMEO:\nBut soft, what light"
WAIT_MS = 60_000  # Playwright's waits: generous, for a loaded 2-core machine
STARTUP_S = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``export_tiny``'s in-place model, with a long context (see the module docstring)."""
    from gpt_core import config

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(config.PRESETS, "tiny", config.PRESETS["tiny"].replace(block_size=CONTEXT))
        return export_tiny(tmp_path_factory.mktemp("playground"), kv_cache="inplace").path


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``gptkit serve`` on a free loopback port, with an API key; yields its base URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "GPTKIT_API_KEY"}
    command = [sys.executable, "-m", "gptkit", "serve", str(model_path), "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--api-key", API_KEY], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"gptkit serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gptkit serve not ready in {STARTUP_S:.0f} s:\n{log.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Any]:
    """The playground, loaded, with the API key typed in.

    Afterwards: the page threw no uncaught error and asked nothing of any other origin (it is
    self-contained: no CDN, no web font).
    """
    context = browser.new_context(base_url=server)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    elsewhere: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "request",
        lambda request: None if request.url.startswith(server) else elsewhere.append(request.url),
    )
    page.goto("/")
    assert page.title() == "gptkit playground"
    page.fill("#api-key", API_KEY)
    yield page
    context.close()
    assert not errors, f"the page threw: {errors}"
    assert not elsewhere, f"the page fetched from elsewhere: {elsewhere}"


def _model(server: str) -> str:
    response = httpx.get(f"{server}/v1/models", headers=_auth(), timeout=30)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


def _metric(server: str, name: str) -> float:
    response = httpx.get(f"{server}/metrics", headers=_auth(), timeout=30)
    response.raise_for_status()
    return metric(response.text, name)


def _fill(page: Any, **fields: str) -> None:
    for element_id, value in fields.items():
        page.fill(f"#{element_id.replace('_', '-')}", value)


def _wait_until_finished(page: Any) -> str:
    """The page's final state: done, stopped or error."""
    page.wait_for_function(
        "['done', 'stopped', 'error'].includes(document.body.dataset.state)", timeout=WAIT_MS
    )
    return str(page.evaluate("document.body.dataset.state"))


def test_generate_shows_exactly_the_apis_greedy_text(page: Any, server: str) -> None:
    response = httpx.post(
        f"{server}/v1/completions",
        headers=_auth(),
        json={"model": _model(server), "prompt": PROMPT, "max_tokens": 24, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    expected = response.json()["choices"][0]
    assert expected["text"], "the greedy text is empty: nothing to compare"

    _fill(page, prompt=PROMPT, max_tokens="24", temperature="0", seed="", top_k="")
    page.click("#generate")
    assert _wait_until_finished(page) == "done", page.text_content("#error")

    assert page.text_content("#output") == expected["text"]
    assert page.text_content("#finish-reason") == expected["finish_reason"]
    assert page.text_content("#error") == ""
    stats = page.text_content("#stats")
    assert "tok/s" in stats and stats.startswith(
        f"{response.json()['usage']['completion_tokens']} "
    )


def test_stop_cancels_the_generation_on_the_server(page: Any, server: str) -> None:
    max_tokens = CONTEXT - 64  # far more than can stream before the click lands
    before = _metric(server, "gptkit_generation_tokens_total")
    _fill(page, prompt="ROMEO:", max_tokens=str(max_tokens), temperature="0", seed="", top_k="")
    page.click("#generate")
    page.wait_for_function("document.getElementById('output').textContent.length > 0")
    page.click("#stop", force=True)  # force: a disabled Stop (generation over) fails below
    state = _wait_until_finished(page)
    assert state == "stopped", f"{state}: the generation ended before Stop was clicked"
    assert page.text_content("#finish-reason") == "stopped"
    assert page.text_content("#error") == ""

    # The server noticed the client going away and freed the slot...
    deadline = time.monotonic() + WAIT_MS / 1000
    while (busy := _metric(server, "gptkit_busy_slots")) != 0:
        assert time.monotonic() < deadline, f"{busy} slots still busy after Stop"
        time.sleep(0.2)
    # ...before the end: it generated fewer tokens than were asked for.
    generated = _metric(server, "gptkit_generation_tokens_total") - before
    assert 0 < generated < max_tokens
    assert httpx.get(f"{server}/health", timeout=30).status_code == 200


def test_errors_show_on_one_line(page: Any, server: str) -> None:
    wrong = httpx.get(f"{server}/v1/models", headers=_auth("wrong-key"), timeout=30)
    assert wrong.status_code == 401
    _fill(page, api_key="wrong-key", prompt=PROMPT, max_tokens="8")
    page.click("#generate")
    assert _wait_until_finished(page) == "error"
    message = " ".join(wrong.json()["error"]["message"].split())
    assert page.text_content("#error") == f"401: {message}"
    assert page.text_content("#output") == ""

    # A request the server refuses (400: the prompt and max tokens exceed the context).
    too_long = {"model": _model(server), "prompt": PROMPT, "max_tokens": CONTEXT + 1}
    refused = httpx.post(f"{server}/v1/completions", headers=_auth(), json=too_long, timeout=30)
    assert refused.status_code == 400
    _fill(page, api_key=API_KEY, max_tokens=str(CONTEXT + 1))
    page.click("#generate")
    assert _wait_until_finished(page) == "error"
    message = " ".join(refused.json()["error"]["message"].split())
    assert page.text_content("#error") == f"400: {message}"
