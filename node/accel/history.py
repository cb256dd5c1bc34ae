"""The history of measurements: one JSON object per line, appended, never rewritten.

A record says: in this setting (workload, model, hardware features), method M ran with status
ok / failed / infeasible, at this median tokens/s, latency and peak memory, measured by whom
(`source`: "bench", "node", or "peer:<peer id>" for records from the swarm). `SCHEMA` is the
version of the record layout; readers skip records of other versions and lines that do not
parse (a half-written last line after a crash, a foreign file), counting what they skipped.

Appends are one `write` of one line on a file opened O_APPEND under an exclusive flock, so two
processes appending at once never interleave their lines. Nothing here decides anything.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

SCHEMA = 1
STATUSES = ("ok", "failed", "infeasible")
MAX_LINE_BYTES = 16_384  # a record larger than this is not a measurement


class HistoryError(ValueError):
    """A record that does not fit the schema; the message says which field."""


def setting_key(features: dict) -> str:
    """Which (workload, model, hardware) a record belongs to: records with one key compete."""
    w, m, h = features.get("workload", {}), features.get("model", {}), features.get("hardware", {})
    return "|".join(str(x) for x in (
        w.get("name") or f"p{w.get('prompts')}g{w.get('group_size')}t{w.get('max_new_tokens')}",
        w.get("rows"), w.get("max_new_tokens"), w.get("greedy"), m.get("name") or m.get("params"),
        h.get("device"), h.get("cpu") or h.get("gpu"), h.get("threads")))


def validate_record(r: dict) -> dict:
    """The record, if it fits schema SCHEMA; HistoryError naming the field otherwise."""
    if not isinstance(r, dict):
        raise HistoryError("a record is a JSON object")
    if r.get("schema") != SCHEMA:
        raise HistoryError(f"schema {r.get('schema')!r} is not {SCHEMA}")
    if not isinstance(r.get("method"), str) or not 0 < len(r["method"]) <= 64:
        raise HistoryError("method must be a name of 1..64 characters")
    if r.get("status") not in STATUSES:
        raise HistoryError(f"status must be one of {', '.join(STATUSES)}")
    f = r.get("features")
    if not isinstance(f, dict) or not all(isinstance(f.get(k), dict) for k in ("workload", "model", "hardware")):
        raise HistoryError("features must hold workload, model and hardware objects")
    for k in ("tokens_per_s", "latency_s", "peak_mem_mb"):
        v = r.get(k, 0.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise HistoryError(f"{k} must be a finite number >= 0")
    if r["status"] == "ok" and not r.get("tokens_per_s", 0) > 0:
        raise HistoryError("an ok record needs tokens_per_s > 0")
    return r


def make_record(method: str, status: str, features: dict, tokens_per_s: float = 0.0, latency_s: float = 0.0,
                peak_mem_mb: float = 0.0, source: str = "bench", **extra) -> dict:
    import time

    r = {"schema": SCHEMA, "time": time.time(), "source": source, "method": method, "status": status,
         "features": features, "tokens_per_s": float(tokens_per_s), "latency_s": float(latency_s),
         "peak_mem_mb": float(peak_mem_mb), **extra}
    r["setting"] = setting_key(features)
    return validate_record(r)


@dataclass
class ReadResult:
    records: list[dict] = field(default_factory=list)
    skipped: int = 0  # lines that did not parse or fit the schema


class History:
    """An append-only JSONL file of measurement records."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()

    def append(self, record: dict) -> None:
        self.extend([record])

    def extend(self, records: Iterable[dict]) -> None:
        lines = []
        for r in records:
            line = json.dumps(validate_record(r), separators=(",", ":"), sort_keys=True) + "\n"
            if len(line.encode()) > MAX_LINE_BYTES:
                raise HistoryError(f"record of {len(line)} bytes is over the {MAX_LINE_BYTES}-byte limit")
            lines.append(line)
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(lines).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # a crash may have left a line without its newline: start ours on a fresh line
            if os.fstat(fd).st_size:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        data = b"\n" + data
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def read(self) -> ReadResult:
        out = ReadResult()
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return out
        with f:
            for raw in f:
                if not raw.strip():
                    continue
                try:
                    out.records.append(validate_record(json.loads(raw)))
                except (ValueError, HistoryError, UnicodeDecodeError):
                    out.skipped += 1
        return out

    def records(self) -> list[dict]:
        return self.read().records
