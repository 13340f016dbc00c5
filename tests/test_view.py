"""`linegate view` in a real headless Chromium (Debian's, driven by Playwright), against a real
`linegate run` on synthetic parts, a real `linegate record` and the real control endpoint.

Every page is opened with the network cut off apart from linegate itself: a Playwright route
aborts any request to another host and the test asserts that none was attempted. Screenshots
go to a temporary folder (printed), or to $LINEGATE_VIEW_SCREENSHOTS when set (the README's
pictures in docs/ are made that way).
"""
from __future__ import annotations

import json
import math
import re
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from conftest import edit_manifest, free_tcp_endpoint, linegate_cmd, make_tiny_bundle
from runtime_helpers import Collector

CHROMIUM = "/usr/bin/chromium"
# The flags Chromium needs on these closed machines (no background network, no sandbox as root).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
THRESHOLD = 0.38  # the tiny bundle's score of synthetic parts is their mean brightness: ~30 % above
OPERATOR_PASSWORD = "correct horse battery staple"
OPERATOR_TOKEN = "operator-token-0123456789abcdef"
VIEWER_TOKEN = "viewer-token-0123456789abcdef"


def _need_browser() -> None:
    pytest.importorskip("starlette", reason="linegate[view] not installed (pip install -e '.[dev]')")
    if shutil.which(CHROMIUM) is None:
        where = f"{CHROMIUM} not found (Debian: apt-get install chromium; .ci/run installs it)"
        if os.environ.get("LINEGATE_SKIP_BROWSER") == "1":
            pytest.skip(f"{where}; skipped: LINEGATE_SKIP_BROWSER=1")
        pytest.fail(f"{where}; to run without it, set LINEGATE_SKIP_BROWSER=1", pytrace=False)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("LINEGATE_VIEW_SCREENSHOTS") or tmp_path_factory.mktemp("view-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nview screenshots: {folder}")
    return folder


def _free_port() -> int:
    return int(free_tcp_endpoint().rsplit(":", 1)[1])


class Proc:
    """A linegate subcommand as a real process, its output in a log file."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(linegate_cmd(*args), stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


class View(Proc):
    def __init__(self, log: Path, bus: str, *extra: str) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        super().__init__(log, "view", "--bus", bus, "--http", f"127.0.0.1:{self.port}", *extra)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.base + "/api/me", timeout=2).read()
                return
            except urllib.error.HTTPError:
                return  # it answers (401 without anonymous access)
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"linegate view did not come up:\n{self.log()}") from None
                time.sleep(0.2)

    def get(self, path: str, token: str | None = None) -> dict:
        req = urllib.request.Request(self.base + path)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        return json.loads(urllib.request.urlopen(req, timeout=10).read())

    def post(self, path: str, body: dict, token: str | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


def runtime(log: Path, bundle: Path, endpoint: str, *extra: str, sources: tuple[str, ...] = ()) -> Proc:
    args = ["run", "--bundle", str(bundle), "--publish", endpoint, "--threshold", str(THRESHOLD),
            "--overlay-accepts", "4"]
    for source in sources or ("synthetic:fps=30,size=160,seed=1", "synthetic:fps=15,size=160,seed=2"):
        args += ["--source", source]
    return Proc(log, *args, *extra)


@pytest.fixture()
def bundle(tmp_path) -> Path:
    return make_tiny_bundle(tmp_path / "bundle", size=32)


@pytest.fixture()
def auth_file(tmp_path) -> Path:
    from lineside.view.auth import hash_password

    path = tmp_path / "view-users.toml"
    path.write_text(f'anonymous = "viewer"\n'
                    f'[[user]]\nname = "alice"\nrole = "operator"\npassword = "{hash_password(OPERATOR_PASSWORD, 1000)}"\n'
                    f'[[user]]\nname = "robot"\nrole = "operator"\ntoken = "{OPERATOR_TOKEN}"\n'
                    f'[[user]]\nname = "hmi"\nrole = "viewer"\ntoken = "{VIEWER_TOKEN}"\n')
    return path


class Browser:
    """One Chromium with a fresh profile; every request to a host other than the view's is
    aborted and remembered (the test asserts there were none)."""

    def __init__(self, playwright, profile: Path, base: str) -> None:
        self.context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1280, "height": 900})
        self.allowed = urlparse(base).netloc
        self.foreign: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def _route(self, route) -> None:
        url = urlparse(route.request.url)
        if url.scheme in ("http", "https", "ws", "wss") and url.netloc != self.allowed:
            self.foreign.append(route.request.url)
            route.abort()
        else:
            route.continue_()

    def close(self) -> None:
        self.context.close()


@pytest.fixture()
def browser(tmp_path):
    _need_browser()
    from playwright.sync_api import sync_playwright

    opened: list[Browser] = []
    with sync_playwright() as playwright:
        def open_browser(base: str) -> Browser:
            b = Browser(playwright, tmp_path / f"profile{len(opened)}", base)
            opened.append(b)
            return b
        yield open_browser
        for b in opened:
            b.close()
    for b in opened:
        assert b.foreign == [], f"the page tried to reach other hosts: {b.foreign}"
        assert b.errors == [], f"script errors on the page: {b.errors}"


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _wait_js(page, expression: str, timeout: float = 15) -> None:
    """Poll a JS expression with page.evaluate (the pages' CSP forbids the eval that
    page.wait_for_function relies on)."""
    _wait(lambda: page.evaluate(expression), timeout, expression)


def _shot(page, shots: Path, name: str, full_page: bool = True) -> None:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    print(f"screenshot: {path}")


def _body_int(page, key: str) -> int | None:
    value = page.evaluate(f"document.body.dataset.{key}")
    return None if value is None else int(value)


def test_live_page_counts_what_a_watcher_counted(tmp_path, bundle, browser, shots):
    """Decisions of a real run arrive on the open page live; when the run is over, the page's
    part and reject counts are those a Subscriber counted; the quiet-bus banner then shows."""
    endpoint = free_tcp_endpoint()
    count = 150
    # 4 subscriptions from the view (decision, overlay, stats, event) + 1 from the watcher
    run = runtime(tmp_path / "run.log", bundle, endpoint, "--wait-subscribers", "5", "--wait-timeout", "60",
                  sources=(f"synthetic:count={count},fps=25,size=160,seed=1",
                           f"synthetic:count={count // 3},fps=9,size=160,seed=2"))
    watcher = Collector(endpoint, ("decision",))
    watcher.start()
    view = View(tmp_path / "view.log", endpoint, "--quiet-after", "2")
    try:
        b = browser(view.base)
        page = b.page
        page.goto(view.base + "/")
        seen: list[int] = []
        deadline = time.monotonic() + 90
        while run.proc.poll() is None and time.monotonic() < deadline:
            parts = _body_int(page, "parts")
            if parts is not None and (not seen or parts != seen[-1]):
                seen.append(parts)
            time.sleep(0.1)
        assert run.proc.returncode == 0, run.log()
        total = count + count // 3
        _wait(lambda: len(watcher.decisions()) == total, 10, "the watcher's decisions")
        _wait(lambda: _body_int(page, "parts") == total, 10, "the page's final count")
        # It was live: the count grew on the open page while the run went on.
        assert len([p for p in seen if 0 < p < total]) >= 3, seen
        assert seen == sorted(seen)
        watched_rejects = sum(h["decision"] == "reject" for h in watcher.decisions())
        assert 0 < watched_rejects < total
        assert page.inner_text("#parts") == str(total)
        assert page.inner_text("#rejects") == str(watched_rejects)
        assert _body_int(page, "rejects") == watched_rejects
        for cam in ("cam0", "cam1"):
            camera_rejects = sum(h["decision"] == "reject" for h in watcher.decisions(cam))
            card = page.locator(f".camera[data-camera='{cam}']")
            assert card.get_attribute("data-decision") in ("accept", "reject")
            assert f"{camera_rejects} rejects" in card.locator(".counts").inner_text()
            assert card.locator("img").evaluate("img => img.naturalWidth") > 0  # an overlay arrived
        assert page.inner_text("#threshold") == f"{THRESHOLD:.4f}"
        assert "tiny-test" in page.inner_text("#model")
        assert re.fullmatch(r"\d+\.\d / \d+\.\d", page.inner_text("#latency"))  # p50 / p99 in ms
        _shot(page, shots, "live")
        # The runtime is gone: no message for --quiet-after seconds -> the banner says so.
        page.wait_for_selector("#banner[data-state='quiet']", timeout=15000)
        assert "quiet" in page.inner_text("#banner")
    finally:
        watcher.stop()
        view.stop()
        run.stop()


def test_the_view_keeps_up_with_a_full_speed_run(tmp_path, bundle):
    """The view follows a run at full speed (an overlay for every frame) without missing a
    message (it never asks the runtime to wait: the bus would drop for it alone, and the gaps
    would show), keeping only the newest picture per camera for the pages."""
    endpoint = free_tcp_endpoint()
    count = 600
    run = runtime(tmp_path / "run.log", bundle, endpoint, "--wait-subscribers", "4", "--wait-timeout", "60",
                  "--overlay-accepts", "1", sources=(f"synthetic:count={count},size=160,seed=3",))
    view = View(tmp_path / "view.log", endpoint)
    try:
        assert run.proc.wait(timeout=120) == 0, run.log()
        _wait(lambda: view.get("/api/live/snapshot")["parts"] == count, 10, "every decision")
        snap = view.get("/api/live/snapshot")
        assert snap["missed"] == {}
        assert snap["cameras"]["cam0"]["overlay"]["version"] == count  # every overlay, newest kept
    finally:
        view.stop()
        run.stop()


def _record_count(db: Path) -> int:
    from lineside.store import open_store

    if not db.exists():
        return 0
    with open_store(str(db)) as store:
        return store.count("decisions")


def test_threshold_what_if_and_rejects_from_the_record(tmp_path, bundle, browser, shots):
    """The what-if count on the threshold page equals the count computed from the record's
    scores; the rejects page shows the record's rejects, filters them and opens one."""
    from lineside.store import open_store

    endpoint = free_tcp_endpoint()
    db = tmp_path / "record.db"
    count = 240
    recorder = Proc(tmp_path / "record.log", "record", endpoint, "--db", str(db))
    # 4 subscriptions from the recorder (decision, overlay, frame, event) + 4 from the view
    run = runtime(tmp_path / "run.log", bundle, endpoint, "--wait-subscribers", "8", "--wait-timeout", "60",
                  "--publish-frames", "reject", sources=(f"synthetic:count={count},fps=60,size=160,seed=4",
                           f"synthetic:count={count // 2},fps=30,size=160,seed=5"))
    view = View(tmp_path / "view.log", endpoint, "--db", str(db))
    try:
        assert run.proc.wait(timeout=120) == 0, run.log()
        total = count + count // 2
        _wait(lambda: _record_count(db) == total, 30, "the record to hold the whole run")
        with open_store(str(db)) as store:
            recorded = store.scores(1000)
            rejects = store.decisions(decision="reject", limit=1000)
            cam1_rejects = store.decisions(decision="reject", camera="cam1", limit=1000)
        scores = sorted(s for s, _, d in recorded if d != "error" and math.isfinite(s))
        value = round(scores[len(scores) // 3], 6)
        expected = sum(s >= value for s in scores)
        assert 0 < expected < len(scores)

        b = browser(view.base)
        page = b.page
        page.goto(view.base + "/threshold")
        _wait_js(page, "document.body.dataset.scores !== undefined")
        assert _body_int(page, "scores") == len(recorded)
        page.fill("#value", str(value))
        assert int(page.inner_text("#whatif-count")) == expected
        assert int(page.inner_text("#whatif-now")) == sum(d == "reject" for _, _, d in recorded)
        # The slider too: drag it to another value, count again from the record.
        page.locator("#slider").fill(str(scores[2 * len(scores) // 3]))
        slid = float(page.input_value("#value"))
        assert int(page.inner_text("#whatif-count")) == sum(s >= slid for s in scores)
        # One camera's what-if (for a per-camera threshold): its own recent parts only.
        with open_store(str(db)) as store:
            cam1 = [(d["score"], d["decision"]) for d in store.decisions(camera="cam1", limit=1000)]
        page.fill("#camera", "cam1")
        page.dispatch_event("#camera", "change")
        _wait_js(page, f"document.body.dataset.scores === '{len(cam1)}'")
        page.fill("#value", str(value))
        assert int(page.inner_text("#whatif-count")) == sum(d != "error" and s >= value for s, d in cam1)
        page.fill("#camera", "")
        page.dispatch_event("#camera", "change")
        _wait_js(page, f"document.body.dataset.scores === '{len(recorded)}'")
        assert page.is_disabled("#apply")  # anonymous viewer, and no control endpoint
        page.fill("#value", str(value))
        _shot(page, shots, "threshold")

        page.goto(view.base + "/rejects")
        page.wait_for_selector("body[data-loaded='1']")
        thumbs = page.locator(".thumb")
        assert thumbs.count() == min(60, len(rejects))
        assert thumbs.first.get_attribute("data-id") == str(rejects[0]["id"])  # newest first
        assert thumbs.first.locator("img").evaluate("img => img.naturalWidth") > 0
        thumbs.first.click()
        page.wait_for_selector("#detail.show")
        header = json.loads(page.inner_text("#detail-header"))
        assert header["id"] == rejects[0]["id"] and header["decision"] == "reject"
        for pic in ("#detail-overlay", "#detail-frame"):  # the reject's full frame and its overlay
            _wait(lambda: page.locator(pic).evaluate("img => img.complete && img.naturalWidth > 0"), 10, pic)
        page.evaluate("window.scrollTo(0, 0)")
        _shot(page, shots, "rejects", full_page=False)  # the detail and the first rows
        page.fill("#camera", "cam1")
        page.click("#apply-filter")
        _wait_js(page, "[...document.querySelectorAll('.thumb')].every(t => t.dataset.camera === 'cam1')")
        assert thumbs.count() == min(60, len(cam1_rejects)) > 0
        # A time window after the last capture holds no reject.
        after = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(rejects[0]["capture_ts"] + 2))
        page.fill("#since", after)
        page.click("#apply-filter")
        _wait_js(page, "document.querySelectorAll('.thumb').length === 0")
        assert page.inner_text("#count") == "0 reject(s)"
    finally:
        view.stop()
        run.stop()
        recorder.stop()


def test_control_is_refused_without_the_operator_role(tmp_path, bundle, auth_file, browser):
    """A viewer's token, an anonymous visitor and a viewer's page all get 403 from the server;
    a wrong password gets no session; an operator logs in with the form."""
    endpoint = free_tcp_endpoint()
    control = free_tcp_endpoint()  # nothing listens: a refused request must not even try it
    view = View(tmp_path / "view.log", endpoint, "--control", control, "--auth", str(auth_file))
    try:
        for token in (VIEWER_TOKEN, None):
            for cmd, body in (("threshold", {"value": 0.5}), ("pause", {}), ("resume", {}),
                              ("load", {"bundle": str(bundle)})):
                status, reply = view.post(f"/api/control/{cmd}", body, token)
                assert status == 403, (cmd, token, reply)
                assert "operator" in reply["error"]
        status, _ = view.post("/api/control/threshold", {"value": 0.5}, "not-a-token-of-anyone-here")
        assert status == 403
        assert view.get("/api/me", VIEWER_TOKEN)["role"] == "viewer"
        assert "control threshold refused for hmi" in view.log()

        b = browser(view.base)
        page = b.page
        page.goto(view.base + "/threshold?token=" + VIEWER_TOKEN)
        page.wait_for_selector("#who:has-text('hmi (viewer)')")
        assert "token=" not in page.url  # the token leaves the address bar
        assert page.is_disabled("#apply")
        # The button is off, but the server is what refuses: the page's own session, forced.
        status = page.evaluate("""() => fetch('/api/control/threshold', {method: 'POST',
            headers: {'Content-Type': 'application/json'}, body: JSON.stringify({value: 0.5})}).then(r => r.status)""")
        assert status == 403
        page.goto(view.base + "/logout")
        page.fill("#name", "alice")
        page.fill("#password", "wrong")
        page.click("#login")
        page.wait_for_selector("#failed:not([hidden])")
        page.fill("#name", "alice")
        page.fill("#password", OPERATOR_PASSWORD)
        page.click("#login")
        page.wait_for_selector("#who:has-text('alice (operator)')")
    finally:
        view.stop()


def test_operator_applies_a_threshold_and_pauses_the_line(tmp_path, bundle, auth_file, browser, shots):
    """Apply on the threshold page changes the runtime's threshold (seen in the next decisions'
    headers and as an event naming the operator); Pause shows the paused banner, Resume ends it."""
    endpoint, control = free_tcp_endpoint(), free_tcp_endpoint()
    db = tmp_path / "record.db"
    run = runtime(tmp_path / "run.log", bundle, endpoint, "--control", control)
    watcher = Collector(endpoint, ("decision", "event"))
    watcher.start()
    recorder = Proc(tmp_path / "record.log", "record", endpoint, "--db", str(db), "--control", control)
    view = View(tmp_path / "view.log", endpoint, "--control", control, "--auth", str(auth_file), "--db", str(db))
    try:
        _wait(lambda: len(watcher.decisions()) > 100, 60, "decisions")
        b = browser(view.base)
        page = b.page
        page.goto(view.base + "/login?next=/threshold")
        page.fill("#name", "alice")
        page.fill("#password", OPERATOR_PASSWORD)
        page.click("#login")
        page.wait_for_selector("#who:has-text('alice (operator)')")
        page.wait_for_selector("#apply:not([disabled])")
        page.fill("#value", "0.3456")
        applied_at = time.monotonic()
        page.click("#apply")
        page.wait_for_selector("#msg.good")
        _wait(lambda: any(h["threshold"] == pytest.approx(0.3456) for h in watcher.decisions(since=applied_at)),
              20, "decisions at the new threshold")
        _wait(lambda: len(watcher.decisions(since=applied_at)) > 20, 20, "more decisions")
        last = watcher.decisions(since=applied_at)[-10:]
        assert [h["threshold"] for h in last] == [pytest.approx(0.3456)] * len(last), last
        assert [h["decision"] for h in last] == ["reject" if h["score"] >= 0.3456 else "accept" for h in last]
        events = [m.header for m in watcher.messages("event") if m.header.get("what") == "threshold"]
        assert events and "alice" in events[-1]["who"]
        assert "control threshold {'value': 0.3456, 'camera': None} by alice" in view.log()
        page.wait_for_selector("#events td:has-text('threshold')", timeout=15000)
        page.reload()  # the histogram with the change: rejects below and above the new line
        page.wait_for_selector("#apply:not([disabled])")
        _wait_js(page, "document.body.dataset.scores > 0")
        page.fill("#value", "0.37")
        _shot(page, shots, "threshold-operator")

        # The rejects page follows the record on its own while the line runs.
        page.goto(view.base + "/rejects")
        page.wait_for_selector("body[data-loaded='1']")
        first = page.locator(".thumb").first.get_attribute("data-id")
        _wait(lambda: page.locator(".thumb").first.get_attribute("data-id") != first, 30, "newer rejects")

        page.goto(view.base + "/threshold")
        page.wait_for_selector("#pause:not([disabled])")
        page.click("#pause")
        page.wait_for_selector("#msg.good")
        page.goto(view.base + "/")
        page.wait_for_selector("#banner[data-state='paused']", timeout=15000)
        _shot(page, shots, "live-paused")
        page.goto(view.base + "/threshold")
        page.wait_for_selector("#resume:not([disabled])")
        page.click("#resume")
        page.wait_for_selector("#msg.good")
        page.goto(view.base + "/")
        page.wait_for_selector("#banner[data-state='ok']", state="attached", timeout=15000)

        # Model swap from the page: the next decisions come from the new bundle.
        new_bundle = make_tiny_bundle(tmp_path / "bundle-v2", size=32)
        edit_manifest(new_bundle, lambda m: m.update(model_id="tiny-v2"))
        page.goto(view.base + "/threshold")
        page.wait_for_selector("#load:not([disabled])")
        page.fill("#bundle", str(new_bundle))
        loaded_at = time.monotonic()
        page.click("#load")
        page.wait_for_selector("#msg.good", timeout=60000)
        _wait(lambda: any(h["model_id"] == "tiny-v2" for h in watcher.decisions(since=loaded_at)), 30,
              "decisions from the new model")
        page.goto(view.base + "/")
        page.wait_for_selector("#model:has-text('tiny-v2')", timeout=15000)
    finally:
        watcher.stop()
        view.stop()
        recorder.stop()
        run.stop()


def test_anonymous_none_keeps_strangers_out(tmp_path, auth_file):
    """With anonymous = "none" a stranger gets the login page and 401 from the API; a token works."""
    pytest.importorskip("starlette", reason="linegate[view] not installed (pip install -e '.[dev]')")
    auth_file.write_text(auth_file.read_text().replace('anonymous = "viewer"', 'anonymous = "none"'))
    view = View(tmp_path / "view.log", free_tcp_endpoint(), "--auth", str(auth_file))
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            view.get("/api/live/snapshot")
        assert err.value.code == 401
        page = urllib.request.urlopen(view.base + "/rejects", timeout=10)  # redirected to the login form
        assert page.url.startswith(view.base + "/login?next=/rejects") and b"Log in" in page.read()
        assert view.get("/api/live/snapshot", VIEWER_TOKEN)["parts"] == 0
        assert view.get("/api/me", OPERATOR_TOKEN) == {"name": "robot", "role": "operator", "control": False,
                                                       "record": False}
    finally:
        view.stop()


def test_view_under_curve_watches_and_steers_with_its_own_key(tmp_path, bundle, auth_file):
    """With CURVE on the bus and the control endpoint, the view subscribes and steers with its
    own key (on both allow-lists): an operator's Apply arrives as `who` = "view (for robot)".
    A view whose key is on neither list sees nothing and can change nothing."""
    from edge.auth import make_keypair
    from runtime_helpers import RunProcess, write_config

    keys = tmp_path / "keys"
    for name in ("server", "view", "stranger"):
        make_keypair(keys, name)
    watchers, operators = tmp_path / "watchers", tmp_path / "operators"
    for folder in (watchers, operators):
        folder.mkdir()
        (folder / "view.key").write_text((keys / "view.key").read_text())
    endpoint, control = free_tcp_endpoint(), free_tcp_endpoint()
    config = write_config(tmp_path / "linegate.toml", {
        "engine": {"bundle": str(bundle)},
        "decision": {"threshold": THRESHOLD},
        "publisher": {"endpoint": endpoint, "curve": {"secret_key": str(keys / "server.key_secret"),
                                                      "allowed_keys": str(watchers)}},
        "control": {"endpoint": control, "allowed_keys": str(operators)},
        "source": [{"uri": "synthetic:fps=20,size=64"}],
    })
    run = RunProcess(config, tmp_path / "run.log")
    views = {name: View(tmp_path / f"view-{name}.log", endpoint, "--control", control, "--auth", str(auth_file),
                        "--server-key", str(keys / "server.key"), "--client-key", str(keys / f"{name}.key_secret"))
             for name in ("view", "stranger")}
    try:
        view, stranger = views["view"], views["stranger"]
        _wait(lambda: view.get("/api/live/snapshot")["parts"] > 10, 60, "decisions through CURVE")
        status, reply = view.post("/api/control/threshold", {"value": 0.3333}, OPERATOR_TOKEN)
        assert status == 200 and reply["result"]["threshold"] == pytest.approx(0.3333), reply
        _wait(lambda: any(e["what"] == "threshold" for e in view.get("/api/live/snapshot")["events"]), 15,
              "the threshold event")
        event = next(e for e in view.get("/api/live/snapshot")["events"] if e["what"] == "threshold")
        assert event["who"] == "view (for robot)" and event["after"] == pytest.approx(0.3333)
        # The stranger: no message at all, and its control requests get no answer.
        assert stranger.get("/api/live/snapshot")["parts"] == 0
        status, reply = stranger.post("/api/control/pause", {}, OPERATOR_TOKEN)
        assert status == 502 and "no reply from" in reply["error"], reply
        assert view.get("/api/live/snapshot")["paused"] is False
    finally:
        for v in views.values():
            v.stop()
        run.kill()
