"""The dashboard served for real and loaded in headless Chromium (Debian's `chromium`,
driven by Playwright; no browser download): it renders positions and trades from a
backtest's ledger, draws the equity chart, opens a position's story, shows stale jobs in
red while /health answers 503, fetches nothing from anywhere else, and a screenshot is
written for a person to look at (set DASHBOARD_SCREENSHOT=docs/dashboard.png to keep one).
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium); the "
                "browser tests need it", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402 - after the skip on purpose
from test_dashboard import START, failing_scans, serving, shared_backtest  # noqa: E402

from core import dashboard as dash  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    return shared_backtest(tmp_path_factory)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")  # fresh user data dir
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=ARGS,
            viewport={"width": 1360, "height": 900})
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser):
    """A page that records every request it makes and every console error."""
    page = browser.new_page()
    page.requests, page.errors = [], []
    page.on("request", lambda r: page.requests.append(r.url))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    yield page
    page.close()


def api(server, path: str):
    with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=10) as resp:
        return json.loads(resp.read())


def load(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-loaded=yes]", timeout=10_000)


def only_local(page, server) -> None:
    assert page.requests and all(u.startswith(server.url) for u in page.requests), \
        page.requests
    assert page.errors == []


def test_page_renders_positions_trades_and_charts(ledger, page, tmp_path):
    with serving(ledger["path"], ledger["end"] + 60_000) as (server, _):
        data = api(server, "/api/dashboard")
        load(page, server.url)

        rows = page.locator("#positions tbody tr")
        assert rows.count() == len(data["positions"]) >= 1
        for p in data["positions"]:
            row = page.locator("#positions tbody tr", has_text=p["position_id"])
            assert row.count() == 1
            text = row.inner_text()
            assert p["symbol"] in text and p["side"] in text and p["entry_price"] in text
            assert p["mark_price"] in text
        trades = page.locator("#trades tbody tr")
        assert trades.count() == len(data["trades"]) >= 3
        first = data["trades"][0]
        assert first["exit_reason"] in trades.nth(0).inner_text()

        # The equity chart drew a line through every point, across most of its width.
        chart = page.locator("#equity-svg")
        assert chart.get_attribute("data-points") == str(len(data["equity"]["points"]))
        d = page.locator("#equity-svg path.equity-line").get_attribute("d")
        assert d.count("L") == len(data["equity"]["points"]) - 1
        box = page.locator("#equity-svg path.equity-line").bounding_box()
        assert box["width"] > 400 and box["height"] > 20
        assert page.locator("#daily-svg rect.bar").count() == len(data["daily"])

        header = page.locator("header").inner_text()
        assert "sim on binanceusdm" in header and "trading" in header
        assert "jobs healthy" in header
        cards = page.locator("#cards").inner_text().lower()  # labels are styled upper case
        assert "drawdown" in cards and "limit 15.0 %" in cards and "daily loss limit" in cards

        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        keep = os.environ.get("DASHBOARD_SCREENSHOT")
        if keep:
            page.screenshot(path=keep, full_page=False)
        only_local(page, server)
    png = (tmp_path / "dashboard.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_a_trade_opens_its_story(ledger, page):
    with serving(ledger["path"], ledger["end"]) as (server, _):
        load(page, server.url)
        link = page.locator("#trades tbody tr").first.locator("a.story-link")
        pid = link.inner_text()
        link.click()
        page.wait_for_url(f"**/position/{pid}")
        page.wait_for_selector("body[data-loaded=yes]")
        story = api(server, f"/api/position/{pid}")
        rows = page.locator("#story tbody tr")
        assert rows.count() == len(story["rows"])
        facts = [rows.nth(i).locator("td").nth(2).inner_text() for i in range(rows.count())]
        assert facts == [r["type"] for r in story["rows"]]
        assert facts.index("signal") < facts.index("risk_decision") < \
            facts.index("order_intent") < facts.index("position_opened") < \
            facts.index("position_closed")
        assert page.locator("#position-title").inner_text() == pid
        assert "closed" in page.locator("#position-cards").inner_text()
        only_local(page, server)


def test_unknown_position_shows_a_404_page(ledger, page):
    with serving(ledger["path"], ledger["end"]) as (server, _):
        response = page.goto(server.url + "position/not-a-position")
        assert response.status == 404
        assert "No such position" in page.locator("h1").inner_text()


def test_stale_jobs_turn_red_and_health_answers_503(ledger, page):
    with serving(ledger["path"], ledger["end"]) as (server, clock):
        assert page.goto(server.url + "health").status == 200
        load(page, server.url)
        assert page.locator("#jobs tr.stale").count() == 0

        clock.set(ledger["end"] + 900_000 + dash.grace_ms(900_000) + 1)  # scan overdue
        response = page.goto(server.url + "health")
        assert response.status == 503
        assert "scan" in json.loads(page.locator("body").inner_text())["stale"]

        load(page, server.url)
        stale = page.locator("#jobs tr.stale")
        assert stale.count() >= 1 and "scan" in stale.first.inner_text()
        color = stale.first.locator("td").first.evaluate(
            "td => getComputedStyle(td).backgroundColor")
        r, g, b = (int(x) for x in color[color.index("(") + 1:-1].split(",")[:3])
        assert r > g and r > b, color  # red
        assert "stale: scan" in page.locator("#health-pill").inner_text()


def test_a_job_failing_at_every_run_turns_red(tmp_path, page):
    path = tmp_path / "bot.db"
    config = failing_scans(path, START)
    with serving(path, START + 90_000, config=config) as (server, _):
        load(page, server.url)
        assert "failing: scan" in page.locator("#health-pill").inner_text()
        [row] = page.locator("#jobs tr.stale").all()
        assert "scan" in row.inner_text() and "failing since" in row.inner_text()
        only_local(page, server)


def test_empty_ledger_page_says_nothing_yet(tmp_path, page):
    from ledger import Ledger

    path = tmp_path / "empty.db"
    Ledger(path).close()
    with serving(path, 0) as (server, _):
        load(page, server.url)
        assert "Nothing recorded yet" in page.locator("#banners").inner_text()
        assert "No open positions" in page.locator("#positions").inner_text()
        assert "No balance snapshots yet" in page.locator("#equity-chart").inner_text()
        only_local(page, server)
