"""Stopping a run without losing work: SIGTERM (what a scheduler or `docker stop` sends) and Ctrl-C ask the
loop to stop after the step it is in; the job then checkpoints and exits 143 / 130. A second Ctrl-C (or
SIGTERM) aborts at once, as in Lightning.

Jobs nest (a sweep runs trainings, the RLHF loop runs reward-model training and PPO): a request seen by any
level is seen by all, so the innermost stops at its next step and each level above stops after it."""

from __future__ import annotations

import signal
import sys
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, what shells report
_ACTIVE: list["StopRequests"] = []  # the levels entered, outermost first


class StopRequests:
    """Context manager: while inside, the first SIGINT/SIGTERM sets `signal` instead of killing the process;
    the loop polls `requested` between steps. Outside the main thread (where Python cannot install handlers)
    it changes nothing."""

    def __init__(self, what: str = "the current iteration", then: str = "saving a checkpoint"):
        self.what, self.then = what, then
        self.signal: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.signal]

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # the second one: stop now
            raise KeyboardInterrupt
        for level in _ACTIVE:
            level.signal = signal.Signals(signum)
        print(f"\n{self.signal.name}: finishing {self.what}, then {self.then} "
              "(press Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequests":
        if _ACTIVE:  # a request that came before this level started holds for it too
            self.signal = _ACTIVE[-1].signal
        _ACTIVE.append(self)
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        _ACTIVE.remove(self)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
