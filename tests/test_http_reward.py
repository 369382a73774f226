"""The `http:URL` reward against small servers this test starts on 127.0.0.1: one that scores, one that fails
twice then works, and ones that hang, answer 500 forever, refuse, or answer the wrong thing."""

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhflab.errors import UserError
from rlhflab.rewards import remote
from rlhflab.rewards.specs import build_reward

PROMPTS = ["What color is the sky?", "Name a fruit."]
COMPLETIONS = ["The sky is red.", "Apple"]
METADATA = [{"bonus": 1}, {"bonus": 0}]


@pytest.fixture(autouse=True)
def _short_backoff(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)


@pytest.fixture
def serve():
    """serve(answer) → the URL of a server on 127.0.0.1 whose POST handler returns answer(request, n) as
    (status, body); n counts requests from 1; `.requests` on the returned function lists the bodies received."""
    servers = []
    released = threading.Event()  # lets hanging handlers finish at teardown

    def start(answer):
        requests = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                requests.append({"body": body, "content_type": self.headers["Content-Type"]})
                status, payload = answer(body, len(requests), released)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())

            def log_message(self, *args):  # keep the test output clean
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads, server.block_on_close = True, False
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        start.requests = requests
        return f"http://127.0.0.1:{server.server_address[1]}/score"

    yield start
    released.set()
    for server in servers:
        server.shutdown()
        server.server_close()


def _score(body, n, released):
    """Length of each completion plus its metadata bonus: shows the server got all three lists, in order."""
    return 200, {"rewards": [len(c) + m["bonus"] for c, m in zip(body["completions"], body["metadata"])]}


def test_scores_come_from_the_server(serve):
    url = serve(_score)
    reward = build_reward(f"http:{url}")
    total, components = reward.score(PROMPTS, COMPLETIONS, METADATA)
    assert total == [16.0, 5.0] and components == {"http": [16.0, 5.0]}
    (request,) = serve.requests
    assert request["body"] == {"prompts": PROMPTS, "completions": COMPLETIONS, "metadata": METADATA}
    assert request["content_type"] == "application/json"


def test_a_server_that_fails_twice_is_retried(serve):
    def flaky(body, n, released):
        return (503, {"error": "warming up"}) if n <= 2 else _score(body, n, released)

    url = serve(flaky)
    assert build_reward(f"http:{url}#retries=2")(PROMPTS, COMPLETIONS, METADATA) == [16.0, 5.0]
    assert len(serve.requests) == 3


def test_500_forever_gives_up_after_the_retries(serve):
    url = serve(lambda body, n, released: (500, "boom"))
    with pytest.raises(UserError) as err:
        build_reward(f"http:{url}#retries=2")(PROMPTS, COMPLETIONS, METADATA)
    message = str(err.value)
    assert url in message and "failed 3 times" in message and "HTTP 500" in message and "\n" not in message
    assert len(serve.requests) == 3


def test_a_hanging_server_times_out(serve):
    def hangs(body, n, released):
        released.wait(5)
        return _score(body, n, released)

    url = serve(hangs)
    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        build_reward(f"http:{url}#timeout=0.2&retries=1")(PROMPTS, COMPLETIONS, METADATA)
    assert time.perf_counter() - started < 3
    assert url in str(err.value) and "failed 2 times" in str(err.value) and "timed out" in str(err.value)
    assert len(serve.requests) == 2


def test_no_server_is_a_one_line_error():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/score"
    with pytest.raises(UserError) as err:
        build_reward(f"http:{url}#retries=1")(PROMPTS, COMPLETIONS, METADATA)
    assert url in str(err.value) and "failed 2 times" in str(err.value) and "refused" in str(err.value)


def test_a_nan_reward_passes_through_as_no_reward(serve):
    """As from any reward: the trainer drops that sample from the update (reward/nonfinite)."""
    url = serve(lambda body, n, released: (200, '{"rewards": [NaN, 1.0]}'))
    scores = build_reward(f"http:{url}")(PROMPTS, COMPLETIONS, METADATA)
    assert math.isnan(scores[0]) and scores[1] == 1.0


def test_a_client_error_is_not_retried(serve):
    url = serve(lambda body, n, released: (404, "no such route"))
    with pytest.raises(UserError, match="HTTP 404.*no such route"):
        build_reward(f"http:{url}")(PROMPTS, COMPLETIONS, METADATA)
    assert len(serve.requests) == 1


@pytest.mark.parametrize("answer, needle", [
    ({"rewards": [1.0]}, "returned 1 values for 2 completions"),
    ({"rewards": ["high", 1.0]}, "return one float per completion"),
    ({"scores": [1.0, 2.0]}, 'expected JSON {"rewards"'),
    ("<html>oops</html>", "answered '<html>oops</html>'"),
])
def test_bad_answers_get_the_checks_of_a_python_reward(serve, answer, needle):
    url = serve(lambda body, n, released: (200, answer))
    with pytest.raises(UserError) as err:
        build_reward(f"http:{url}")(PROMPTS, COMPLETIONS, METADATA)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert len(serve.requests) == 1  # a wrong answer is not retried


@pytest.mark.parametrize("spec, needle", [
    ("http:ftp://127.0.0.1/score", "not an http(s) URL"),
    ("http:", "not an http(s) URL"),
    ("http:http://127.0.0.1:1/score#timeout=soon", "timeout='soon' is not a number"),
    ("http:http://127.0.0.1:1/score#retry=2", "unknown option 'retry'"),
    ("http:http://127.0.0.1:1/score#retries=-1", "retries ≥ 0"),
])
def test_bad_http_specs(spec, needle):
    with pytest.raises(UserError) as err:
        build_reward(spec)
    assert needle in str(err.value) and spec in str(err.value) and "\n" not in str(err.value)
