"""The HTML report in a real browser: it renders, its script runs, it asks for nothing remote.

Every kind of page pcace writes is opened: the one-target report, the overview of a run with
several targets and each target's page, the overview of a per-label run and each label's
page. On each, the script runs to its end, nothing remote is requested, and every sortable
table sorts when a header is clicked.

Headless Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
JSON messages separated by NUL bytes on file descriptors 3 and 4), with the standard library
only. Every request the page makes is recorded; anything other than ``file:``, ``data:`` or
``about:`` fails the test. A variant page with a remote image checks that this detection works.
Skipped when no Chromium is installed (CI installs the Debian ``chromium`` package).
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-extensions", "--disable-sync",
    "--disable-default-apps", "--no-first-run", "--no-default-browser-check", "--mute-audio",
    "--hide-scrollbars", "--window-size=1200,900",
]


def find_chromium() -> str | None:
    env = os.environ.get("PCACE_CHROMIUM")
    if env and Path(env).exists():
        return env
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A small but complete report: a random MNIST-shaped CNN ranked on 40 noise images."""
    import pcace
    from pcace.viz import collect_assets, write_report
    from pcace.zoo import mnist_cnn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = mnist_cnn().eval()
        images = torch.rand(40, 1, 28, 28)
        result = pcace.rank(model, images, target=3, progress=False, device="cpu")
        run = tmp_path_factory.mktemp("browser-run")
        result.save(run)
        collect_assets(run, model, images, result, featurevis_steps=4, progress=False)
        return write_report(run, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def multi_pages(tmp_path_factory) -> dict[str, Path]:
    """The pages of a run with two targets and of a per-label run (two labels)."""
    import pcace
    from pcace.viz import write_report
    from pcace.zoo import mnist_cnn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(1)
        model = mnist_cnn().eval()
        images = torch.rand(40, 1, 28, 28)
        pages = {}
        runs = {"targets": dict(images=images, target=[1, 3]),
                "labels": dict(images=(images, torch.arange(40) % 2), per_label=True)}
        for kind, kwargs in runs.items():
            result = pcace.rank(model, progress=False, device="cpu", permutations=19,
                                **kwargs)
            run = tmp_path_factory.mktemp(f"browser-{kind}")
            result.save(run)
            pages[f"{kind}-overview"] = write_report(run, progress=False)
            for page in sorted(run.glob("report-*.html")):
                pages[f"{kind}-{page.stem}"] = page
        return pages
    finally:
        torch.set_num_threads(threads)


class DevTools:
    """A minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, binary: str, profile: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_fds() -> None:  # in the child: the protocol expects fds 3 (in) and 4 (out)
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=wire_fds)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (OSError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the debugging pipe")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        self._next_id += 1
        msg: dict = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def settle(self, seconds: float) -> None:
        """Collect events for ``seconds`` more."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._read_message(deadline))
        except TimeoutError:
            pass


def open_page(binary: str, page: Path, profile: Path) -> tuple[DevTools, str]:
    """Load ``page`` with network, console and log monitoring; return the client and session."""
    dt = DevTools(binary, profile)
    target = dt.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = dt.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Network", "Runtime", "Log"):
        dt.send(f"{domain}.enable", session=session)
    dt.events.clear()
    dt.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
    dt.wait_for("Page.loadEventFired", timeout=60)
    dt.settle(0.5)
    return dt, session


def remote_requests(events: list[dict]) -> list[str]:
    urls = [e["params"]["request"]["url"] for e in events
            if e.get("method") == "Network.requestWillBeSent"]
    return [u for u in urls if not u.startswith(LOCAL_SCHEMES)]


def console_errors(events: list[dict]) -> list[str]:
    errors = []
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(json.dumps(params.get("exceptionDetails", {}))[:300])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(json.dumps(params.get("args", []))[:300])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            errors.append(params["entry"].get("text", "")[:300])
        elif method == "Network.loadingFailed":
            errors.append(f"loading failed: {params.get('errorText')}")
    return errors


def evaluate(dt: DevTools, session: str, expression: str):
    result = dt.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                     session=session)
    if "exceptionDetails" in result:
        raise AssertionError(f"page script failed: {result['exceptionDetails']}")
    return result["result"].get("value")


def test_report_renders_without_network_or_errors(chromium, report, tmp_path):
    dt, session = open_page(chromium, report, tmp_path / "profile")
    try:
        assert remote_requests(dt.events) == []
        assert console_errors(dt.events) == []
        assert evaluate(dt, session, "document.body.dataset.ready") == "1"
        figures = sorted(p.stem for p in (report.parent / "figures").iterdir())
        images = evaluate(dt, session, """Array.from(document.images).map(function (i) {
            return [i.dataset.figure, i.complete && i.naturalWidth > 0,
                    i.getBoundingClientRect().width]; })""")
        assert sorted(name for name, _, _ in images) == figures
        assert all(loaded for _, loaded, _ in images), images
        assert all(0 < width <= 1200 for _, _, width in images), images
        # nothing wider than the window: the navigation wraps instead of running off
        assert evaluate(dt, session, "document.documentElement.scrollWidth") <= 1200
        assert evaluate(dt, session, "document.querySelector('nav').scrollWidth") <= 1200
        n_channels = len(__import__("pandas").read_csv(report.parent / "channels.csv"))
        assert evaluate(dt, session, "document.querySelectorAll('#channel-table tbody tr')"
                        ".length") == n_channels
        shot = dt.send("Page.captureScreenshot", {"format": "png"}, session=session)
        png = base64.b64decode(shot["data"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        (report.parent / "report-screenshot.png").write_bytes(png)
    finally:
        dt.close()


def test_table_sorts_and_filters(chromium, report, tmp_path):
    dt, session = open_page(chromium, report, tmp_path / "profile")
    try:
        column = "Array.from(document.querySelectorAll('#channel-table tbody tr'))" \
                 ".filter(function (r) { return r.style.display !== 'none'; })" \
                 ".map(function (r) { return parseFloat(r.cells[{col}].dataset.v); })"
        col = evaluate(dt, session,
                       "Array.from(document.querySelectorAll('#channel-table th'))"
                       ".findIndex(function (h) { return h.dataset.col === 'pcace'; })")
        header = f"document.querySelectorAll('#channel-table th')[{col}]"
        evaluate(dt, session, f"{header}.click()")
        ascending = evaluate(dt, session, column.replace("{col}", str(col)))
        assert ascending == sorted(ascending)
        evaluate(dt, session, f"{header}.click()")
        descending = evaluate(dt, session, column.replace("{col}", str(col)))
        assert descending == sorted(descending, reverse=True)
        assert evaluate(dt, session, f"{header}.getAttribute('aria-sort')") == "descending"

        evaluate(dt, session, """(function () {
            var f = document.getElementById('channel-filter');
            f.value = 'conv2 5'; f.dispatchEvent(new Event('input')); })()""")
        shown = evaluate(dt, session, "Array.from(document.querySelectorAll("
                         "'#channel-table tbody tr')).filter(function (r) {"
                         " return r.style.display !== 'none'; }).map(function (r) {"
                         " return [r.dataset.layer, r.dataset.channel]; })")
        assert shown == [["conv2", "5"]]
        assert "1 of" in evaluate(dt, session,
                                  "document.getElementById('channel-count').textContent")
        assert console_errors(dt.events) == []
    finally:
        dt.close()


def test_detects_a_remote_request(chromium, report, tmp_path):
    """The detection itself: a page that loads a remote image must be caught."""
    page = tmp_path / "leaky.html"
    html = report.read_text(encoding="utf-8")
    page.write_text(html.replace(
        "<main>", '<main><img src="http://pcace-test.invalid/pixel.png" alt="remote">', 1),
        encoding="utf-8")
    dt, _ = open_page(chromium, page, tmp_path / "profile")
    try:
        assert remote_requests(dt.events) == ["http://pcace-test.invalid/pixel.png"]
    finally:
        dt.close()


def test_dump_dom_shows_script_ran(chromium, report, tmp_path):
    """The simplest check, without the protocol: the DOM after load, as Chromium dumps it."""
    out = subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
         report.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert re.search(r'<body[^>]*data-ready="1"', out)
    assert len(re.findall(r'src="data:image/(?:png|jpeg);base64,', out)) == len(list(
        (report.parent / "figures").iterdir()))
    assert "channels shown" in out


def test_navigation_of_a_many_layer_report_wraps(chromium, tmp_path):
    """55 layers with long names: the navigation wraps within the window, and every layer
    link leads to an element of the page (a full section or the layer's table row)."""
    from test_report_evidence import hand_result

    from pcace.viz import write_report

    names = [f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in range(9) for c in (1, 2)]
    result = hand_result(["conv1", *names], channels=8, strong=("layer3.8.conv2",))
    run = tmp_path / "run"
    result.save(run)
    page = write_report(run, progress=False)
    dt, session = open_page(chromium, page, tmp_path / "profile")
    try:
        assert evaluate(dt, session, "document.documentElement.scrollWidth") <= 1200
        nav = evaluate(dt, session, """(function () { var n = document.querySelector('nav');
            var r = n.getBoundingClientRect(); return [n.scrollWidth, r.height]; })()""")
        assert nav[0] <= 1200 and nav[1] < 400, nav
        missing = evaluate(dt, session, """Array.from(document.querySelectorAll('nav a'))
            .map(function (a) { return a.getAttribute('href').slice(1); })
            .filter(function (id) { return !document.getElementById(id); })""")
        assert missing == []
        assert console_errors(dt.events) == []
    finally:
        dt.close()


#: Clicks a header of every sortable table (a numeric one where there is one) and returns,
#: per table, the header's aria-sort, whether it sorted numbers, and the column's keys in
#: the order the rows now stand (read as the page's script reads them).
SORT_EVERY_TABLE = """(function () {
  return Array.from(document.querySelectorAll('table.sortable')).map(function (t) {
    var ths = Array.from(t.tHead.rows[0].cells);
    var th = ths.find(function (h) { return h.dataset.type === 'number'; }) || ths[0];
    var numeric = th.dataset.type === 'number';
    th.click();
    var keys = Array.from(t.tBodies[0].rows).map(function (r) {
      var c = r.cells[th.cellIndex], raw = c.getAttribute('data-v');
      if (raw === null) { raw = c.textContent; }
      if (!numeric) { return raw.toLowerCase(); }
      var v = parseFloat(raw);
      return isNaN(v) ? -1e308 : v; });
    return [th.getAttribute('aria-sort'), numeric, keys]; }); })()"""


def check_page(chromium: str, page: Path, profile: Path) -> None:
    """Renders, runs its script to the end, asks for nothing remote, sorts its tables."""
    dt, session = open_page(chromium, page, profile)
    try:
        assert remote_requests(dt.events) == []
        assert console_errors(dt.events) == []
        assert evaluate(dt, session, "document.body.dataset.ready") == "1"
        loaded = evaluate(dt, session, "Array.from(document.images).every(function (i) {"
                          " return i.complete && i.naturalWidth > 0; })")
        assert loaded
        tables = evaluate(dt, session, SORT_EVERY_TABLE)
        assert tables, "no sortable table on the page"
        for aria, numeric, keys in tables:
            assert aria == "ascending"
            assert keys == sorted(keys), (numeric, keys)
        assert console_errors(dt.events) == []
    finally:
        dt.close()


def test_one_target_page_works_in_the_browser(chromium, report, tmp_path):
    check_page(chromium, report, tmp_path / "profile")


@pytest.mark.parametrize("kind", ["targets", "labels"])
def test_every_page_of_a_multi_target_run_works_in_the_browser(chromium, multi_pages, kind,
                                                               tmp_path):
    """The overview (the class atlas page) and each target's or label's page."""
    pages = {name: page for name, page in multi_pages.items() if name.startswith(kind)}
    assert f"{kind}-overview" in pages and len(pages) == 3, sorted(multi_pages)
    for name, page in sorted(pages.items()):
        check_page(chromium, page, tmp_path / f"profile-{name}")
