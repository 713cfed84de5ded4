"""The ownership map page (`GET /` on the admin API) in a real headless Chromium: Debian's
`chromium` and `chromium-driver`, driven by selenium. The page is loaded once per test and
never navigated again: everything it shows after a reload it found by itself, polling
`/ownership/map` and `/decisions`.

Screenshots are kept in target/test-artifacts/ of the checkout (map-page-*.png).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from harness import LibrdkafkaClient, record, unique
from harness.keyward import Keyward

from test_keyward import TABLE, keys_of

ARTIFACTS = Path(__file__).resolve().parents[2] / "target" / "test-artifacts"

# orders swapped between eu and us, initech moved to eu, and us frozen.
FLIPPED = (
    TABLE.replace(
        'owners: { eu: ["0-7"], us: ["8-15"] }\n    null_key: reject',
        'owners: { eu: ["8-15"], us: ["0-7"] }\n    null_key: reject',
    ).replace("owners: { eu: [acme, globex], us: [initech] }", "owners: { eu: [acme, globex, initech] }")
    + "frozen: [us]\n"
)
TAKEN_OVER = TABLE + "takeover: { us: eu }\n"

# What the page shows, read from its DOM: per rule card, the slot or partition bar's segments
# and the rows of its parts table, with the classes that highlight frozen and taken-over parts
# and the styles those classes give.
READ_DOM = """
const out = {};
for (const card of document.querySelectorAll('section.rule')) {
  const seg = (g) => ({
    region: g.dataset.region, first: +g.dataset.first, last: +g.dataset.last,
    frozen: g.dataset.frozen === 'true', takeover_from: g.dataset.takeoverFrom || null,
    text: g.textContent, classes: [...g.classList].sort(),
    hatched: getComputedStyle(g).backgroundImage.includes('repeating-linear-gradient'),
    outline: getComputedStyle(g).outlineStyle,
  });
  out[card.dataset.rule] = {
    segments: [...card.querySelectorAll('.seg:not(.unowned)')].map(seg),
    rows: [...card.querySelectorAll('tr.part')].map((r) => ({
      what: r.querySelector('[data-what]').dataset.what, region: r.dataset.region,
      frozen: r.dataset.frozen === 'true', takeover_from: r.dataset.takeoverFrom || null,
      text: r.innerText.replace(/\\s+/g, ' ').trim(),
    })),
    rates: Object.fromEntries([...card.querySelectorAll('td[data-decision]')].map(
      (c) => [c.dataset.decision, {total: c.dataset.total === undefined ? null : +c.dataset.total,
                                   rate: c.dataset.rate === undefined ? null : +c.dataset.rate}])),
  };
}
return {
  rules: out,
  order: [...document.querySelectorAll('section.rule')].map((c) => c.dataset.rule),
  hash: document.getElementById('hash').textContent,
  version: document.getElementById('version').textContent,
  region: document.getElementById('region').textContent,
  legend: [...document.querySelectorAll('#legend .key')].map((k) => k.textContent),
  marker: window.__keywardMapMarker || null,
};
"""


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module. Debian's chromium and chromium-driver, which
    dev/install-test-deps installs; no browser is downloaded."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "no chromium or chromedriver on PATH: run dev/install-test-deps"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def kw(tmp_path, eu, us):
    with Keyward(tmp_path, "eu", {"eu": eu, "us": us}, TABLE) as kw:
        yield kw


def wait_for_dom(driver, predicate, timeout_s: float, what: str) -> dict:
    """Reads the page's DOM every 50 ms until `predicate(dom)` holds; the last DOM read."""
    deadline = time.monotonic() + timeout_s
    while True:
        dom = driver.execute_script(READ_DOM)
        if predicate(dom):
            return dom
        if time.monotonic() > deadline:
            raise AssertionError(f"the page did not show {what} within {timeout_s}s; it shows:\n"
                                 + json.dumps(dom, indent=1)[:4000])
        time.sleep(0.05)


def screenshot(driver, name: str) -> Path:
    """The whole page, beyond the window too, as target/test-artifacts/<name>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path = ARTIFACTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"screenshot: {path}")
    return path


def segments(dom: dict, rule: str) -> list[tuple]:
    return [
        (s["region"], s["first"], s["last"], s["frozen"], s["takeover_from"]) for s in dom["rules"][rule]["segments"]
    ]


def rows(dom: dict, rule: str) -> list[tuple]:
    return [(r["what"], r["region"], r["frozen"], r["takeover_from"]) for r in dom["rules"][rule]["rows"]]


def test_the_map_shows_every_rule_and_follows_reloads_without_a_refresh(browser, kw):
    url = f"http://127.0.0.1:{kw.admin_port}/"
    browser.get(url)
    first = kw.ownership()
    dom = wait_for_dom(browser, lambda d: d["hash"] == first["hash"] and "orders" in d["rules"], 5, "the table")

    # Every rule of the table, in order, and a card for writes no rule matches.
    assert dom["order"] == [r["name"] for r in first["table"]["rules"]] + ["-"]
    assert (dom["region"], dom["version"]) == ("eu", "1")
    assert segments(dom, "orders") == [("eu", 0, 7, False, None), ("us", 8, 15, False, None)]
    assert [s["text"] for s in dom["rules"]["orders"]["segments"]] == ["eu 0-7", "us 8-15"]
    assert rows(dom, "tenants") == [("acme, globex", "eu", False, None), ("initech", "us", False, None)]
    assert rows(dom, "accounts") == [("tenant-1, tenant-42", "eu", False, None), ("tenant-7", "us", False, None)]
    assert segments(dom, "inventory") == [("eu", 0, 1, False, None), ("us", 2, 3, False, None)]
    assert rows(dom, "audit-log") == [("every write", "eu", False, None)]
    assert dom["rules"]["telemetry"]["segments"] == dom["rules"]["telemetry"]["rows"] == []
    assert dom["legend"][:2] == ["eu", "us"]
    assert "frozen: writes held" in dom["legend"] and "taken over by another region" in dom["legend"]
    # Nothing came from anywhere but the admin API.
    resources = browser.execute_script("return performance.getEntriesByType('resource').map((r) => r.name)")
    assert resources and all(r.startswith(url) for r in resources), resources
    screenshot(browser, "map-page-1-loaded")

    # A page that navigated or reloaded would lose this.
    browser.execute_script("window.__keywardMapMarker = 'the same page'")

    # The file is edited (as an editor saves: a new file renamed over it); the watcher reloads.
    started = time.monotonic()
    tmp = kw.dir / ".ownership.yaml.swp"
    tmp.write_text(FLIPPED)
    os.rename(tmp, kw.table_path)
    dom = wait_for_dom(browser, lambda d: d["version"] == "2", 2.0, "the flipped table")
    assert time.monotonic() - started < 2.0
    flipped = kw.ownership()
    assert dom["marker"] == "the same page", "the page was reloaded or navigated"
    assert dom["hash"] == flipped["hash"] != first["hash"]
    assert segments(dom, "orders") == [("us", 0, 7, True, None), ("eu", 8, 15, False, None)]
    frozen, owned = dom["rules"]["orders"]["segments"]
    assert frozen["hatched"] and "frozen" in frozen["classes"], frozen
    assert not owned["hatched"] and "frozen" not in owned["classes"], owned
    assert rows(dom, "tenants") == [("acme, globex, initech", "eu", False, None)]
    assert rows(dom, "accounts") == [("tenant-1, tenant-42", "eu", False, None), ("tenant-7", "us", True, None)]
    assert "frozen: writes held" in dom["rules"]["accounts"]["rows"][1]["text"]
    screenshot(browser, "map-page-2-flipped-and-frozen")

    # A takeover through the API: us's parts are eu's now, outlined, and say whose they were.
    kw.table_path.write_text(TAKEN_OVER)
    started = time.monotonic()
    status, body = kw.admin("/reload", "POST")
    assert status == 200 and json.loads(body)["result"] == "loaded", body
    dom = wait_for_dom(browser, lambda d: d["version"] == "3", 2.0, "the takeover")
    assert time.monotonic() - started < 2.0
    assert dom["marker"] == "the same page", "the page was reloaded or navigated"
    assert dom["hash"] == kw.ownership()["hash"]
    assert segments(dom, "orders") == [("eu", 0, 7, False, None), ("eu", 8, 15, False, "us")]
    owned, taken = dom["rules"]["orders"]["segments"]
    assert taken["outline"] == "dashed" and "taken-over" in taken["classes"], taken
    assert owned["outline"] != "dashed", owned
    assert rows(dom, "tenants") == [("acme, globex", "eu", False, None), ("initech", "eu", False, "us")]
    assert "taken over from us" in dom["rules"]["tenants"]["rows"][1]["text"]
    screenshot(browser, "map-page-3-taken-over")


def test_the_map_shows_decisions_per_rule(browser, kw, eu):
    topic, tenants = unique("orders.map"), unique("tenant.map")
    eu.create_topic(topic, partitions=1)
    eu.create_topic(tenants, partitions=1)
    browser.get(f"http://127.0.0.1:{kw.admin_port}/")
    # The page's first sample, before anything is produced: the rates start from it.
    first_counts = lambda d: "orders" in d["rules"] and d["rules"]["orders"]["rates"]["forwarded"]["total"] == 0  # noqa: E731
    wait_for_dom(browser, first_counts, 5, "the first counts")

    client = LibrdkafkaClient()
    recs = [record(k.encode(), b"v", partition=0) for k in keys_of(kw, "eu", 3, "map") + keys_of(kw, "us", 2, "map")]
    client.produce(kw.bootstrap, topic, recs, flush_every=1)
    client.produce(kw.bootstrap, tenants, [record(b"k", b"v", headers=[("tenant", b"initech")])])

    zero = {d: 0 for d in ("forwarded", "redirected", "rejected", "held", "audited")}
    status, body = kw.admin("/decisions")
    assert status == 200, body
    decisions = json.loads(body)
    assert decisions == {
        "version": 1,
        "records": [
            {"rule": rule, **zero, **counted}
            for rule, counted in [
                ("orders", {"forwarded": 3, "rejected": 2}),
                ("lenient", {}),
                ("watched", {}),
                ("tenants", {"rejected": 1}),
                ("accounts", {}),
                ("inventory", {}),
                ("audit-log", {}),
                ("us-only", {}),
                ("telemetry", {}),
                ("-", {}),
            ]
        ],
    }, json.dumps(decisions)

    def shown(d, rule, decision):
        return d["rules"][rule]["rates"][decision]

    dom = wait_for_dom(
        browser,
        lambda d: shown(d, "orders", "forwarded")["total"] == 3 and shown(d, "tenants", "rejected")["total"] == 1,
        3,
        "the counts",
    )
    # Counted since the page's first sample, and within the last 5 s: a rate, not 0.
    assert shown(dom, "orders", "forwarded")["rate"] > 0, dom["rules"]["orders"]
    assert shown(dom, "orders", "rejected")["total"] == 2
    assert shown(dom, "orders", "held") == {"total": 0, "rate": 0}
    screenshot(browser, "map-page-4-decisions")


def test_the_map_and_its_json_are_self_contained_and_exact(kw):
    with urllib.request.urlopen(f"http://127.0.0.1:{kw.admin_port}/", timeout=10) as r:
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        # The browser itself refuses anything not inline or not from the admin API.
        assert r.headers["Content-Security-Policy"].startswith("default-src 'none';")
        page = r.read().decode()
    assert "http://" not in page and "https://" not in page and " src=" not in page
    # /ownership/map is /ownership with each rule's parts.
    ownership, status_body = kw.ownership(), kw.admin("/ownership/map")
    assert status_body[0] == 200
    mapped = json.loads(status_body[1])
    parts = {r["name"]: r.pop("parts") for r in mapped["table"]["rules"]}
    assert mapped == ownership
    owned = lambda region: {"region": region, "takeover_from": None, "frozen": False}  # noqa: E731
    assert parts["orders"] == [{"first": 0, "last": 7, **owned("eu")}, {"first": 8, "last": 15, **owned("us")}]
    assert parts["tenants"] == [{"values": ["acme", "globex"], **owned("eu")}, {"values": ["initech"], **owned("us")}]
    assert parts["us-only"] == [owned("us")]
    assert parts["telemetry"] == []


def test_the_map_needs_no_token_where_reload_does(tmp_path, eu, us):
    """Read-only, like /ownership: the page and its JSON answer without the reload token."""
    token_file = tmp_path / "admin-token"
    token_file.write_text("s3cret-token\n")
    with Keyward(tmp_path, "eu", {"eu": eu, "us": us}, TABLE, admin_extra=f"reload_token_file: {token_file}") as kw:
        for path in ("/", "/ownership/map", "/decisions"):
            assert kw.admin(path)[0] == 200, path
        assert kw.admin("/reload", "POST")[0] == 401
