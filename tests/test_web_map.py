"""The web map in a real browser: `crackmap serve` in its own process, Debian's chromium driven by
Playwright (headless WebGL through SwiftShader; no browser download).

Without chromium the test skips locally and fails under CI=true, like the PostGIS tests.
The screenshots are kept as out/test-artifacts/web-map-{plain,condition}.png (and in the test's
tmp folder): one store as `crackmap run` writes it today, one with crack types, sections and a
pattern area as the road-condition work adds them.
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
import shapely
from conftest import CRACKMAP
from playwright.sync_api import sync_playwright
from serve_fixtures import CRACK_COUNT, SOUTH, STEP_DEG, WEST, expected, publish_map

from pipeline import gpkg

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "out" / "test-artifacts"
CRACK_LAYERS = "window.crackmap.state.crackLayers.map(l => l.id)"
# resolves once the map has drawn everything it asked for (at most 20 s: an idle event that
# already fired never comes again)
WAIT_IDLE = """new Promise(resolve => {
    const map = window.crackmap.map;
    if (map.loaded() && map.areTilesLoaded() && !map.isMoving()) return resolve(true);
    map.once("idle", () => resolve(true));
    setTimeout(() => resolve(false), 20000);
})"""


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        reason = os.environ.get(
            "CRACKMAP_CHROMIUM_UNAVAILABLE", f"{CHROMIUM} is not installed (infra/chromium.sh installs it)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"chromium is not available ({reason}); CI must run the browser test", pytrace=False)
        pytest.skip(f"chromium is not available ({reason})")
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_condition_layers(store: Path) -> None:
    """What `crackmap sections` adds: crack types, three sections (Good/Fair/Poor), a pattern area."""
    con = gpkg.connect(str(store))
    con.execute(
        "UPDATE cracks SET crack_type = CASE CAST(substr(crack_id, -2) AS INTEGER) % 3 "
        "WHEN 0 THEN 'longitudinal' WHEN 1 THEN 'transverse' ELSE 'diagonal' END"
    )
    for i, condition in enumerate(("Good", "Fair", "Poor")):
        box = shapely.box(
            WEST + 4 * i * STEP_DEG - STEP_DEG / 2,
            SOUTH - 0.00005,
            WEST + 4 * (i + 1) * STEP_DEG - STEP_DEG / 2,
            SOUTH + 0.00035,
        )
        con.execute(
            "INSERT INTO sections (geom, survey_id, sections_run_id, road_id, level, from_m, to_m, "
            "section_m, computed_at, is_current, condition_class) "
            "VALUES (?, 'survey-a', 's1', 'r1', 'section', ?, ?, 10, '2026-11-29T00:00:00Z', 1, ?)",
            (gpkg.encode(box, 4326), 10 * i, 10 * i + 10, condition),
        )
    area = shapely.MultiPolygon(
        [shapely.box(WEST + 8 * STEP_DEG, SOUTH + 0.0001, WEST + 10 * STEP_DEG, SOUTH + 0.0002)]
    )
    con.execute(
        "INSERT INTO pattern_areas (geom, survey_id, scene_id, model_name, model_version, "
        "pattern_no, class, area_m2, crack_density_m_per_m2) "
        "VALUES (?, 'survey-a', 'road-1', 'test-b16', '1.0.0', 1, 'alligator', 150, 4)",
        (gpkg.encode(area, 4326),),
    )
    con.close()


@pytest.fixture(params=["plain", "condition"])
def server(request, tmp_path):
    """`crackmap serve` of a store made here (plain, or with condition layers), on a free loopback port."""
    store = tmp_path / "map.gpkg"
    publish_map(str(store), tmp_path)
    if request.param == "condition":
        add_condition_layers(store)
    port = free_port()
    script = Path(sys.executable).parent / "crackmap"
    command = [str(script)] if script.exists() else CRACKMAP
    with open(tmp_path / "serve.log", "w") as log:
        process = subprocess.Popen(
            [*command, "serve", str(store), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
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
                        raise RuntimeError(
                            f"crackmap serve did not start: {(tmp_path / 'serve.log').read_text()}"
                        ) from None
                    time.sleep(0.3)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=20)


def test_the_map_renders_cracks_and_a_click_shows_length(request, chromium, server, tmp_path):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(chromium),
            args=["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox"],
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on(
                "requestfailed",
                lambda request: (
                    request.failure != "net::ERR_ABORTED"  # a tile
                    and errors.append(f"request failed: {request.url} ({request.failure})")
                ),
            )  # panned away
            # a console error would be, e.g., the content security policy blocking MapLibre's worker
            page.on("console", lambda message: message.type == "error" and errors.append(message.text))
            page.goto(server)
            # polled from here: wait_for_function evaluates strings in the page, which its CSP forbids
            deadline = time.monotonic() + 90
            while not page.evaluate("Boolean(window.crackmap && window.crackmap.ready)"):
                assert time.monotonic() < deadline, f"the map did not become idle: {errors}"
                time.sleep(0.25)
            page.evaluate(WAIT_IDLE)
            rendered = page.evaluate(
                f"window.crackmap.map.queryRenderedFeatures({{layers: {CRACK_LAYERS}}})"
                ".map(f => f.properties.crack_id)"
            )
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
            layers = page.evaluate(CRACK_LAYERS)
            if "condition" in request.node.callspec.id:
                # type as line style, sections by condition class, pattern areas: one layer each
                assert layers == [
                    "cracks-longitudinal",
                    "cracks-transverse",
                    "cracks-diagonal",
                    "cracks-joint",
                    "cracks-pattern",
                ]
                by_type = page.evaluate(
                    f"Object.fromEntries({CRACK_LAYERS}.map(id => [id, "
                    "window.crackmap.map.queryRenderedFeatures({layers: [id]}).length]))"
                )
                assert all(by_type[f"cracks-{t}"] > 0 for t in ("longitudinal", "transverse", "diagonal"))
                conditions = page.evaluate(
                    "window.crackmap.map.queryRenderedFeatures({layers: ['sections']})"
                    ".map(f => f.properties.condition_class)"
                )
                assert set(conditions) == {"Good", "Fair", "Poor"}
                assert (
                    page.evaluate(
                        "window.crackmap.map.queryRenderedFeatures({layers: ['pattern_areas']}).length"
                    )
                    > 0
                )
                assert "Sections by condition" in page.inner_text("#legend")
                assert page.is_visible("#f-type-label")
                page.select_option("#f-type", "transverse")  # the type filter leaves only that type
                time.sleep(0.5)
                shown = page.evaluate(
                    f"window.crackmap.map.queryRenderedFeatures({{layers: {CRACK_LAYERS}}})"
                    ".map(f => f.properties.crack_type)"
                )
                assert shown and set(shown) == {"transverse"}
                page.select_option("#f-type", "")
                deadline = time.monotonic() + 30
                rendered_ids = (
                    f"window.crackmap.map.queryRenderedFeatures({{layers: {CRACK_LAYERS}}})"
                    ".map(f => f.properties.crack_id)"
                )
                while len(set(page.evaluate(rendered_ids))) < CRACK_COUNT:
                    assert time.monotonic() < deadline, "clearing the type filter left cracks hidden"
                    time.sleep(0.25)
                page.evaluate(WAIT_IDLE)
            else:  # as `crackmap run` writes a store: every crack drawn, whatever its type column holds
                assert layers in (
                    ["cracks"],
                    [
                        "cracks-longitudinal",
                        "cracks-transverse",
                        "cracks-diagonal",
                        "cracks-joint",
                        "cracks-pattern",
                    ],
                )
            if "condition" in request.node.callspec.id:  # the crack-probability raster under the cracks
                page.select_option("#f-raster", "probability")
                deadline = time.monotonic() + 30
                while not page.evaluate(
                    "[...window.crackmap.state.rasters].length > 0 && "
                    "[...window.crackmap.state.rasters].every(id => "
                    "window.crackmap.map.isSourceLoaded(id))"
                ):
                    assert time.monotonic() < deadline, f"the probability raster did not load: {errors}"
                    time.sleep(0.25)
                assert page.evaluate("[...window.crackmap.state.rasters]") == [
                    "raster:probability:survey-a/road-1"
                ]
            page.screenshot(path=str(tmp_path / "web-map.png"))
            assert not errors, errors
        finally:
            browser.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    artifact = ARTIFACTS / f"web-map-{request.node.callspec.id}.png"
    shutil.copy(tmp_path / "web-map.png", artifact)
    assert artifact.stat().st_size > 10_000
