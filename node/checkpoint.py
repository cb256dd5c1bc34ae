"""Atomic checkpoints: model, optimiser, round counter, RNG state.

A checkpoint is a directory `round-NNNNNNNN/` holding a transformers checkpoint (opens with
plain `AutoModelForCausalLM.from_pretrained`), `trainer.pt` (optimiser and RNG state) and
`manifest.json` (round, sha256 of every file). It is written to a temporary directory, every
file fsync'ed, then renamed into place in one step: a crash leaves either the old set or the
new one, never half a checkpoint. Loading verifies every hash; a checkpoint that fails is
refused with a reason, renamed `*.corrupt` (kept for inspection, never overwritten), and the
newest good one is used instead. Only the newest `keep` good checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.pt"
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or read."""


@dataclass
class Checkpoint:
    path: Path
    round: int
    extra: dict[str, Any]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a small file atomically (tmp + fsync + rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, keep: int = 2, log: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.keep = max(1, keep)
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.root.mkdir(parents=True, exist_ok=True)

    def _candidates(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.root.glob("round-*"):
            if p.is_dir() and p.suffix == "" and p.name[6:].isdigit():
                out.append((int(p.name[6:]), p))
        return sorted(out, reverse=True)

    def save(self, round_: int, save_model: Callable[[Path], None], trainer_state: dict[str, Any],
             extra: dict[str, Any] | None = None) -> Path:
        final = self.root / f"round-{round_:08d}"
        tmp = self.root / f".tmp-round-{round_:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(tmp)
        torch.save(trainer_state, tmp / TRAINER_STATE)
        files = {}
        for f in sorted(tmp.iterdir()):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
                files[f.name] = _sha256(f)
        manifest = {"format": FORMAT, "round": round_, "files": files, "extra": extra or {}}
        atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        _fsync_dir(tmp)
        if final.exists():  # same round written again (e.g. after falling back): replace it whole
            old = self.root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)
        self._prune()
        return final

    def _prune(self) -> None:
        good = [p for _, p in self._candidates()]
        for p in good[self.keep:]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp-round-*"):  # leftovers of a crash mid-save
            shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def verify(path: Path) -> Checkpoint:
        """Check a checkpoint's manifest and every file hash. Raises CheckpointError."""
        mpath = path / MANIFEST
        try:
            manifest = json.loads(mpath.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no {MANIFEST} (incomplete or not a rollshare checkpoint)") from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable {MANIFEST}: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(
                manifest.get("files"), dict) or not isinstance(manifest.get("round"), int):
            raise CheckpointError(f"{path}: {MANIFEST} has an unknown format")
        for name, digest in manifest["files"].items():
            f = path / name
            if "/" in name or not f.is_file():
                raise CheckpointError(f"{path}: file {name} listed in the manifest is missing")
            if _sha256(f) != digest:
                raise CheckpointError(f"{path}: file {name} does not match its sha256 (corrupt)")
        if TRAINER_STATE not in manifest["files"]:
            raise CheckpointError(f"{path}: no {TRAINER_STATE} in the manifest")
        return Checkpoint(path=path, round=manifest["round"], extra=manifest.get("extra", {}))

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies. Corrupt ones are refused, logged and set aside."""
        for _, p in self._candidates():
            try:
                return self.verify(p)
            except CheckpointError as e:
                aside = p.with_name(p.name + ".corrupt")
                n = 1
                while aside.exists():
                    aside = p.with_name(f"{p.name}.corrupt{n}")
                    n += 1
                os.replace(p, aside)
                self.log(f"refusing checkpoint: {e}; moved it to {aside.name}, trying an older one")
        return None

    @staticmethod
    def load_trainer_state(ckpt: Checkpoint) -> dict[str, Any]:
        try:
            return torch.load(ckpt.path / TRAINER_STATE, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{ckpt.path}: cannot read {TRAINER_STATE}: {e}") from None
