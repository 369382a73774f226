"""`rlhflab prefs serve`: the labeling page's API, its guards (token, Host, Origin, paths), durability under
SIGKILL, and the page itself driven in headless Chromium."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from starlette.testclient import TestClient
from typer.testing import CliRunner

from rlhflab.cli.prefs import prefs_app
from rlhflab.preferences.store import Candidate, NewPair, PreferenceStore
from rlhflab.preferences.web import create_app

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"
ORIGIN = "http://127.0.0.1:8765"
PAIRS = [
    ("What color is the sky?", "Blue, on a clear day; red and orange at sunset.", "The sky is red."),
    ("What is 2 + 2?", "4", "2 + 2 is 5."),
    ("Name the capital of France.", "Paris.", "The capital of France is Lyon."),
    ("Say something kind.", "You are doing better than you think.", "Fine."),
    ("Translate 'merci' to English.", "Thank you.", "Please."),
    ("How many legs does a spider have?", "Eight.", "Six, like every insect."),
]


def make_store(tmp_path: Path, pairs=PAIRS) -> Path:
    db = tmp_path / "prefs.db"
    with PreferenceStore(db) as store:
        store.add_pairs(NewPair(prompt, Candidate(a), Candidate(b), "test") for prompt, a, b in pairs)
    return db


def choices(db: Path, labeler: str) -> dict[int, str]:
    with PreferenceStore(db, create=False) as store:
        return {c.pair_id: c.choice for c in store.comparisons(labeler=labeler)}


@pytest.fixture
def client(tmp_path):
    return TestClient(create_app(make_store(tmp_path), TOKEN), base_url=ORIGIN)


@contextmanager
def served(db: Path):
    """`rlhflab prefs serve` in a subprocess on a free port; yields (process, the URL it printed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "rlhflab", "prefs", "serve", "--db", str(db), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    try:
        printed = []
        for line in proc.stdout:  # until the URL line (or the end, when the server failed to start)
            printed.append(line)
            if match := re.search(r"http://127\.0\.0\.1:\d+/[\w-]+/", line):
                break
        assert match, f"no URL printed: {''.join(printed)}"
        yield proc, match[0]
    finally:
        proc.kill()
        proc.wait()


# -- the API ------------------------------------------------------------------------------------------------


def test_state_label_and_undo_follow_the_terminal_labelers_rules(client, tmp_path):
    state = client.get(f"/{TOKEN}/api/state", params={"labeler": "ana"}).json()
    assert state["pair"] == {"id": 1, "prompt": PAIRS[0][0], "a": PAIRS[0][1], "b": PAIRS[0][2]}
    assert state["progress"] == {"labeler": "ana", "labeled": 0, "left": 6, "total": 6, "by_labeler": {}}
    assert state["keys"] == {"a": "a", "b": "b", "t": "tie", "s": "skip", "u": "undo"}

    for pair_id, choice in [(1, "a"), (2, "skip"), (3, "tie")]:
        answer = client.post(f"/{TOKEN}/api/label", json={"labeler": "ana", "pair_id": pair_id, "choice": choice})
        assert answer.status_code == 200
        assert answer.json()["saved"] == {"pair_id": pair_id, "choice": choice}
        assert answer.json()["pair"]["id"] == pair_id + 1  # a skip counts as labeled, as in the terminal
    assert choices(tmp_path / "prefs.db", "ana") == {1: "a", 2: "skip", 3: "tie"}

    # The same label again is a no-op; a changed mind is refused until undone.
    again = client.post(f"/{TOKEN}/api/label", json={"labeler": "ana", "pair_id": 3, "choice": "tie"})
    assert again.status_code == 200 and again.json()["progress"]["labeled"] == 3
    changed = client.post(f"/{TOKEN}/api/label", json={"labeler": "ana", "pair_id": 3, "choice": "a"})
    assert changed.status_code == 400 and "undo that label" in changed.json()["error"]
    undone = client.post(f"/{TOKEN}/api/undo", json={"labeler": "ana"}).json()
    assert undone["undone"] == {"pair_id": 3, "choice": "tie"}
    assert undone["pair"]["id"] == 3 and undone["progress"]["left"] == 4

    # Another labeler has their own pending list; progress counts everyone.
    ben = client.post(f"/{TOKEN}/api/label", json={"labeler": "ben", "pair_id": 1, "choice": "b"}).json()
    assert ben["pair"]["id"] == 2
    assert ben["progress"]["by_labeler"] == {"ana": 2, "ben": 1}
    assert client.post(f"/{TOKEN}/api/undo", json={"labeler": "cy"}).json()["undone"] is None


@pytest.mark.parametrize("body, message", [
    ({"labeler": "ana", "pair_id": 1, "choice": "maybe"}, "choice: Input should be 'a', 'b', 'tie' or 'skip'"),
    ({"labeler": "", "pair_id": 1, "choice": "a"}, "labeler: String should have at least 1 character"),
    ({"labeler": "ana", "choice": "a"}, "pair_id: Field required"),
    ({"labeler": "ana", "pair_id": 99, "choice": "a"}, "no pair with id 99"),
    ([1, 2], "the body must be a JSON object"),
])
def test_a_bad_label_request_is_a_400_naming_the_field_and_stores_nothing(client, tmp_path, body, message):
    answer = client.post(f"/{TOKEN}/api/label", json=body)
    assert answer.status_code == 400
    assert message in answer.json()["error"]
    assert choices(tmp_path / "prefs.db", "ana") == {}


def test_count_labeled_by_labeler_counts_every_comparison_skips_included(tmp_path):
    with PreferenceStore(make_store(tmp_path)) as store:
        assert store.count_labeled_by_labeler() == {}
        store.record_labels([(1, "ben", "skip", None), (2, "ben", "a", None), (1, "ana", "tie", None)])
        assert store.count_labeled_by_labeler() == {"ana": 1, "ben": 2}


# -- the guards ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/index.html", "/static/app.js", "/api/state?labeler=ana",
                                  "/wrong-token/", f"/{TOKEN}x/", f"/{TOKEN[:-1]}/"])
def test_no_token_or_a_wrong_one_is_403(client, path):
    answer = client.get(path)
    assert answer.status_code == 403
    assert "the URL `rlhflab prefs serve` printed" in answer.text


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8765", "127.0.0.1.evil.example", "", "[::2]:80"])
def test_a_foreign_host_header_is_403_even_with_the_token(client, host):
    answer = client.get(f"/{TOKEN}/", headers={"Host": host})
    assert answer.status_code == 403
    assert "is not this machine's loopback" in answer.text


@pytest.mark.parametrize("host", ["127.0.0.1:8765", "localhost:9000", "LOCALHOST", "[::1]:8765"])
def test_the_loopback_under_any_port_is_served_so_ssh_forwarding_works(client, host):
    answer = client.get(f"/{TOKEN}/", headers={"Host": host})
    assert answer.status_code == 200
    assert "Which answer is better?" in answer.text


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:9999", "https://127.0.0.1:8765"])
def test_a_cross_site_origin_is_403_and_its_label_is_not_stored(client, tmp_path, origin):
    body = {"labeler": "ana", "pair_id": 1, "choice": "a"}
    answer = client.post(f"/{TOKEN}/api/label", json=body, headers={"Origin": origin})
    assert answer.status_code == 403
    assert "cross-site request" in answer.text
    assert choices(tmp_path / "prefs.db", "ana") == {}
    same_origin = client.post(f"/{TOKEN}/api/label", json=body, headers={"Origin": ORIGIN})
    assert same_origin.status_code == 200


def test_every_answer_carries_the_security_headers(client):
    for answer in (client.get(f"/{TOKEN}/"), client.get("/"), client.get(f"/{TOKEN}/static/app.js")):
        assert answer.headers["content-security-policy"].startswith("default-src 'self'")
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "no-referrer"


@contextmanager
def in_thread(db: Path):
    """The app under uvicorn on a free port in this process (cheaper than a subprocess); yields its URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(db, TOKEN), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/{TOKEN}/"
    finally:
        server.should_exit = True
        thread.join()


def test_no_path_outside_the_pages_own_files_is_served_nor_a_foreign_host(tmp_path):
    """Raw paths sent as written (http.client does not normalise `..`) to a real server."""
    with in_thread(make_store(tmp_path)) as url:
        parts = urlsplit(url)

        def get(path: str, headers: dict | None = None) -> tuple[int, bytes]:
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            connection.request("GET", path, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()

        assert get(f"/{TOKEN}/static/app.js")[0] == 200
        assert get(f"/{TOKEN}/", {"Host": "evil.example"})[0] == 403
        assert get(f"/{TOKEN}/", {"Origin": "http://evil.example"})[0] == 403
        for path, status in [
            ("/static/../../etc/passwd", 403),
            ("/%2e%2e/%2e%2e/etc/passwd", 403),
            (f"/{TOKEN}/static/../../../../etc/passwd", 404),
            (f"/{TOKEN}/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", 404),
            (f"/{TOKEN}/static/..%2f..%2f..%2f..%2fetc%2fpasswd", 404),
            (f"/{TOKEN}/static//etc/passwd", 404),
            (f"/{TOKEN}/static/%2e%2e/web.py", 404),
            (f"/{TOKEN}/static/%2e%2e/store.py", 404),
        ]:
            got, body = get(path)
            assert (got, b"root:" in body, b"import" in body) == (status, False, False), path


# -- durability ---------------------------------------------------------------------------------------------


def test_sigkill_loses_no_label_the_server_acknowledged(tmp_path):
    """Two labelers post at once; the server is killed with -9 while a label is in flight."""
    db = make_store(tmp_path, [(f"prompt {i}", f"answer {i}a", f"answer {i}b") for i in range(40)])
    acknowledged: dict[str, dict[int, str]] = {"ana": {}, "ben": {}}
    with served(db) as (proc, url):

        def label(name: str, picks: str) -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                for pair_id, choice in enumerate(picks, start=1):
                    body = {"labeler": name, "pair_id": pair_id, "choice": choice}
                    acknowledged[name][pair_id] = http.post("api/label", json=body).json()["saved"]["choice"]

        threads = [threading.Thread(target=label, args=(name, picks)) for name, picks in
                   [("ana", ["a", "b", "tie", "skip"] * 3), ("ben", ["b", "a"] * 6)]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # In flight when killed: may or may not be stored, never twice.
        def post_in_flight() -> None:
            try:
                httpx.post(url + "api/label", json={"labeler": "ana", "pair_id": 13, "choice": "a"}, timeout=5)
            except httpx.HTTPError:  # the connection dies with the server
                pass

        in_flight = threading.Thread(target=post_in_flight)
        in_flight.start()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        in_flight.join()
    assert proc.returncode == -signal.SIGKILL
    assert all(len(labels) == 12 for labels in acknowledged.values())
    with PreferenceStore(db, create=False) as store:
        stored = store.comparisons()
    by_labeler = {name: {c.pair_id: c.choice for c in stored if c.labeler == name} for name in acknowledged}
    assert len(stored) == sum(len(labels) for labels in by_labeler.values())  # one comparison per pair and labeler
    assert {p: by_labeler["ben"][p] for p in acknowledged["ben"]} == acknowledged["ben"] == by_labeler["ben"]
    assert {p: by_labeler["ana"][p] for p in acknowledged["ana"]} == acknowledged["ana"]
    assert set(by_labeler["ana"]) - set(acknowledged["ana"]) <= {13}


def test_serve_refuses_a_missing_db_and_a_busy_port_in_one_line(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(prefs_app, ["serve", "--db", str(tmp_path / "none.db")])
    assert missing.exit_code == 2 and "no preference DB at" in missing.output
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = runner.invoke(prefs_app, ["serve", "--db", str(make_store(tmp_path)), "--port",
                                         str(taken.getsockname()[1])])
    assert busy.exit_code == 2
    assert "cannot listen on 127.0.0.1:" in busy.output and "pick another --port" in busy.output


def test_serve_without_the_web_extra_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "rlhflab.preferences.web")
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed: importing it raises ImportError
    result = CliRunner().invoke(prefs_app, ["serve", "--db", str(make_store(tmp_path))])
    assert result.exit_code == 2
    assert "prefs serve needs the web extra (uvicorn is missing): pip install 'rlhflab[web]'" in result.output


def test_ctrl_c_stops_the_server_cleanly(tmp_path):
    with served(make_store(tmp_path)) as (proc, url):
        assert httpx.get(url, timeout=30).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "stopped; the labels are in" in proc.stdout.read()


# -- the page in a real browser ------------------------------------------------------------------------------

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs Debian's Chromium: apt-get install -y chromium (.ci/run installs it)")
def test_labeling_page_in_headless_chromium_by_keyboard_and_click_with_undo(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright: pip install -e '.[test]'")
    expect = sync_api.expect
    db = make_store(tmp_path)
    with served(db) as (proc, url), sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 330})
            page.goto(url)
            page.fill("#labeler", "ana")
            page.keyboard.press("a")  # typed into the name field: not a label
            page.fill("#labeler", "ana")
            page.keyboard.press("Enter")
            status, prompt = page.locator("#status"), page.locator("#prompt")
            expect(prompt).to_have_text(PAIRS[0][0])
            expect(page.locator("#answer-a")).to_have_text(PAIRS[0][1])
            expect(page.locator("#answer-b")).to_have_text(PAIRS[0][2])

            def then(text: str, next_prompt: int) -> None:
                expect(status).to_have_text(text)
                expect(prompt).to_have_text(PAIRS[next_prompt][0])

            page.keyboard.press("a")
            then("saved: pair 1 = a", 1)
            page.get_by_role("button", name="B is better").click()
            then("saved: pair 2 = b", 2)
            page.keyboard.press("t")
            then("saved: pair 3 = tie", 3)
            page.keyboard.press("u")
            then("undone: pair 3 = tie", 2)

            # A label the server never acknowledged is not shown as saved, and the page stays on its pair.
            page.route("**/api/label", lambda route: route.abort())
            page.get_by_role("button", name="skip").click()
            expect(status).to_contain_text("not saved")
            expect(prompt).to_have_text(PAIRS[2][0])
            page.unroute("**/api/label")

            # While the label is in flight the page says "saving", takes no other label, and stays on its pair.
            held = []
            page.route("**/api/label", lambda route: held.append(route))
            page.get_by_role("button", name="skip").click()
            while not held:
                page.wait_for_timeout(20)
            expect(status).to_have_text("saving pair 3 = skip…")
            page.keyboard.press("b")
            expect(page.get_by_role("button", name="skip")).to_be_disabled()
            expect(prompt).to_have_text(PAIRS[2][0])
            assert choices(db, "ana") == {1: "a", 2: "b"}
            held[0].continue_()
            then("saved: pair 3 = skip", 3)
            page.unroute("**/api/label")
            page.keyboard.press("b")
            then("saved: pair 4 = b", 4)

            # A second labeler at the same time, named in the URL: their own pending list.
            ben = browser.new_context().new_page()
            ben.goto(url + "?labeler=ben")
            expect(ben.locator("#prompt")).to_have_text(PAIRS[0][0])
            ben.keyboard.press("a")
            expect(ben.locator("#status")).to_have_text("saved: pair 1 = a")
            expect(ben.locator("#progress")).to_have_text("ben: 1 labeled, 5 left of 6 · by labeler: ana 4, ben 1")

            page.reload()  # the name is remembered; progress comes from the store
            expect(page.locator("#progress")).to_have_text("ana: 4 labeled, 2 left of 6 · by labeler: ana 4, ben 1")
            expect(prompt).to_have_text(PAIRS[4][0])
            page.keyboard.press("a")
            then("saved: pair 5 = a", 5)
            shot = os.environ.get("RLHFLAB_SCREENSHOT") or str(tmp_path / "prefs_serve.png")
            page.screenshot(path=shot)
            page.keyboard.press("b")
            expect(status).to_have_text("saved: pair 6 = b")
            expect(page.locator("#done")).to_be_visible()
            os.kill(proc.pid, signal.SIGKILL)  # what the pages showed as saved must be on disk now
            proc.wait()
        finally:
            browser.close()
    assert choices(db, "ana") == {1: "a", 2: "b", 3: "skip", 4: "b", 5: "a", 6: "b"}
    assert choices(db, "ben") == {1: "a"}
    out = tmp_path / "prefs.jsonl"
    exported = CliRunner().invoke(prefs_app, ["export", "--db", str(db), "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    assert "wrote 5 preference rows" in exported.output and "1 skip" in exported.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    picked = {1: "a", 2: "b", 4: "b", 5: "a", 6: "b"}  # pair 3 was skipped: left out, as a skip in the terminal
    assert rows == [{"prompt": PAIRS[i - 1][0], "chosen": PAIRS[i - 1][1 if c == "a" else 2],
                     "rejected": PAIRS[i - 1][2 if c == "a" else 1]} for i, c in picked.items()]
