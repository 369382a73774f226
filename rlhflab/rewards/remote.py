"""The `http:URL` reward: scores from a server in another process or on another machine (a reward model
served elsewhere), one POST per batch. The stdlib's urllib is the client: nothing to install.

Request: `POST URL` with JSON `{"prompts": [str], "completions": [str], "metadata": [dict]}` (equal lengths).
Response: JSON `{"rewards": [float]}`, one per completion, in order; `specs.build_reward` checks them like a
`python:` reward's (count, numbers; NaN/inf means "no reward" for that sample).

Options go after `#` in the URL (a fragment is never sent to the server): `timeout=SECONDS` per attempt
(default 30), `retries=N` (default 3). Connection errors, timeouts, HTTP 429 and 5xx are retried N times with
exponential backoff, then fail as one line naming the URL; other HTTP errors and malformed answers fail at once.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

from rlhflab.errors import UserError

BACKOFF_S = 0.5  # the first pause between attempts; it doubles after each
_OPTIONS = {"timeout": (float, 30.0), "retries": (int, 3)}


class HttpReward:
    """POST each batch to `url`; -> the server's list of rewards (checked by the caller)."""

    def __init__(self, spec_url: str):
        self.url, _, fragment = spec_url.partition("#")
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{self.url!r} is not an http(s) URL; write e.g. http:http://127.0.0.1:8000/score")
        options = {name: default for name, (_, default) in _OPTIONS.items()}
        for key, value in urllib.parse.parse_qsl(fragment, keep_blank_values=True):
            if key not in _OPTIONS:
                raise ValueError(f"unknown option {key!r} after '#'; valid: {', '.join(_OPTIONS)} "
                                 "(e.g. #timeout=10&retries=2)")
            try:
                options[key] = _OPTIONS[key][0](value)
            except ValueError:
                raise ValueError(f"{key}={value!r} is not a number") from None
        self.timeout, self.retries = options["timeout"], options["retries"]
        if self.timeout <= 0 or self.retries < 0:
            raise ValueError("timeout must be > 0 seconds and retries ≥ 0")

    def __call__(self, prompts: list[str], completions: list[str], metadata: list[dict]) -> list:
        body = json.dumps({"prompts": prompts, "completions": completions, "metadata": metadata}, default=str)
        request = urllib.request.Request(self.url, data=body.encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return self._rewards(response.read())
            except urllib.error.HTTPError as err:
                if err.code != 429 and err.code < 500:  # the request is wrong: sending it again will not help
                    raise UserError(f"reward server {self.url} answered HTTP {err.code} {err.reason}: "
                                    f"{_snippet(err.read())}") from None
                problem = f"HTTP {err.code} {err.reason}"
            except urllib.error.URLError as err:  # refused, unknown host, or a timeout while connecting
                problem = str(err.reason)
            except (TimeoutError, ConnectionError) as err:  # no answer within the timeout, or dropped mid-answer
                problem = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise UserError(f"reward server {self.url} failed {self.retries + 1} times (last: {problem}); check that it "
                        f"is running, or raise the limits after '#' in the spec (timeout={self.timeout:g} s, "
                        f"retries={self.retries})")

    def _rewards(self, payload: bytes) -> list:
        try:
            rewards = json.loads(payload)["rewards"]
        except (ValueError, KeyError, TypeError):
            rewards = None
        if not isinstance(rewards, list):
            raise UserError(f"reward server {self.url} answered {_snippet(payload)}; expected JSON "
                            '{"rewards": [one float per completion]}')
        return rewards


def _snippet(payload: bytes, limit: int = 120) -> str:
    text = " ".join(payload.decode(errors="replace").split())
    return repr(text if len(text) <= limit else text[:limit] + "…")
