"""Live status for people: one line that rewrites itself on a terminal, a line every few
seconds elsewhere (logs, CI). Never used for machine-readable output (that is --json-log)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_status(m: dict, extra: str = "") -> str:
    s = (f"round {m['round']:>6}  reward(ma{50}) {m['reward_ma']:.3f}  "
         f"{m['tokens_per_s']:>7.0f} tok/s  step {m['step_s'] * 1000:>5.0f} ms  loss {m['loss']:+.4f}")
    if m.get("method"):
        s += f"  gen {m['method']}"
    if m.get("peers") is not None:
        s += f"  peers {m['peers']}  in {m.get('groups_in', 0)}  out {m.get('groups_out', 0)}"
    return s + (f"  {extra}" if extra else "")


class StatusLine:
    def __init__(self, mode: str = "auto", stream: TextIO = sys.stderr, every_s: float = 5.0):
        self.stream = stream
        self.live = mode == "auto" and stream.isatty()
        self.off = mode == "off"
        self.every_s = every_s
        self._last = 0.0
        self._width = 0

    def update(self, m: dict, extra: str = "") -> None:
        if self.off:
            return
        line = format_status(m, extra)
        if self.live:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
            self.stream.flush()
        elif time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.live and self._width:
            self.stream.write("\n")
            self.stream.flush()
