"""The web map in a real browser: `crackmap serve` in its own process, Debian's chromium driven by
Playwright (headless WebGL through SwiftShader; no browser download).

Without chromium the test skips locally and fails under CI=true, like the PostGIS tests.
The screenshot is kept as out/test-artifacts/web-map.png (and in the test's tmp folder).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from serve_fixtures import CRACK_COUNT, expected, publish_map

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "out" / "test-artifacts"
CRACK_LAYERS = "window.crackmap.state.crackLayers.map(l => l.id)"


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        reason = os.environ.get("CRACKMAP_CHROMIUM_UNAVAILABLE", f"{CHROMIUM} is not installed "
                                "(infra/chromium.sh installs it)")
        if os.environ.get("CI") == "true":
            pytest.fail(f"chromium is not available ({reason}); CI must run the browser test", pytrace=False)
        pytest.skip(f"chromium is not available ({reason})")
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """`crackmap serve` of a store made here, on a free loopback port; its base URL."""
    store = tmp_path / "map.gpkg"
    publish_map(str(store), tmp_path)
    port = free_port()
    script = Path(sys.executable).parent / "crackmap"
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from flows.cli import main; main()"]
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen([*command, "serve", str(store), "--port", str(port)], stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "healthz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"crackmap serve did not start: {(tmp_path / 'serve.log').read_text()}")
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def test_the_map_renders_cracks_and_a_click_shows_length(chromium, server, tmp_path):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(chromium),
            args=["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("requestfailed", lambda request: errors.append(f"request failed: {request.url}"))
            # a console error would be, e.g., the content security policy blocking MapLibre's worker
            page.on("console", lambda message: message.type == "error" and errors.append(message.text))
            page.goto(server)
            # polled from here: wait_for_function evaluates strings in the page, which its CSP forbids
            deadline = time.monotonic() + 90
            while not page.evaluate("Boolean(window.crackmap && window.crackmap.ready)"):
                assert time.monotonic() < deadline, f"the map did not become idle: {errors}"
                time.sleep(0.25)
            page.evaluate("new Promise(resolve => { const m = window.crackmap.map; "
                          "m.loaded() && !m.isMoving() ? resolve() : m.once('idle', resolve); })")
            rendered = page.evaluate(f"window.crackmap.map.queryRenderedFeatures({{layers: {CRACK_LAYERS}}})"
                                     ".map(f => f.properties.crack_id)")
            assert len(set(rendered)) == CRACK_COUNT
            # click the middle of crack 5 and read the popup
            x, y, crack_id = page.evaluate(f"""(() => {{
                const map = window.crackmap.map;
                const f = map.queryRenderedFeatures({{layers: {CRACK_LAYERS}}})
                    .find(f => f.properties.length_m === {expected(5)["length_m"]});
                const [a, b] = f.geometry.coordinates;
                const p = map.project([(a[0] + b[0]) / 2, (a[1] + b[1]) / 2]);
                return [p.x, p.y, f.properties.crack_id];
            }})()""")
            page.mouse.click(x, y)
            popup = page.wait_for_selector(".maplibregl-popup", timeout=10_000)
            text = popup.inner_text()
            assert "length_m" in text and f"{expected(5)['length_m']:g}" in text and crack_id in text
            assert "Type" not in page.inner_text("#filters") or page.is_hidden("#f-type-label")
            page.screenshot(path=str(tmp_path / "web-map.png"))
            assert not errors, errors
        finally:
            browser.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "web-map.png", ARTIFACTS / "web-map.png")
    assert (ARTIFACTS / "web-map.png").stat().st_size > 10_000
