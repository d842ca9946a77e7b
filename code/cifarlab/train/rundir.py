"""The run directory: what a run leaves on disk, written atomically, never silently overwritten.

Layout (DESIGN.md): config.yaml, metrics.csv, log.txt, summary.json, curves.png,
checkpoints/last.pt and best.pt. metrics.csv and log.txt are regenerated from the epoch
history (which also lives in last.pt), so a run killed at any moment resumes with files that
match its checkpoint exactly.
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import os
from pathlib import Path
from typing import Any

from cifarlab.errors import RunDirError
from cifarlab.utils import atomic_write_text

LOCK_NAME = ".lock"

BASE_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s", "images_per_s"]


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        self.last = self.ckpt_dir / "last.pt"
        self.best = self.ckpt_dir / "best.pt"

    def lock(self) -> "RunDirLock":
        return RunDirLock(self.path)

    # -- state of the folder ------------------------------------------------------------------
    def summary(self) -> dict[str, Any] | None:
        f = self.path / "summary.json"
        if not f.is_file():
            return None
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError:
            return None

    def is_finished(self) -> bool:
        s = self.summary()
        return bool(s and s.get("finished"))

    def holds_run(self) -> bool:
        """True when a run has written here (other files, e.g. train.sh's stdout.txt, do not count)."""
        return any((self.path / n).exists() for n in ("config.yaml", "metrics.csv", "summary.json", "checkpoints/last.pt"))

    def prepare(self, resume: bool) -> bool:
        """Check the folder against the request; return True when there is a checkpoint to resume."""
        if self.is_finished():
            raise RunDirError(f"{self.path} holds a finished run; choose another --run-dir or remove it")
        has_ckpt = self.last.is_file()
        if resume:  # (a missing folder is refused by Trainer.fit before the lock creates it)
            for stale in self.ckpt_dir.glob(".*.tmp"):  # a save interrupted by a kill
                stale.unlink()
            return has_ckpt
        if self.holds_run():
            raise RunDirError(f"{self.path} already holds an unfinished run; pass --resume to continue it "
                              f"or choose another --run-dir")
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        return False

    # -- writers ------------------------------------------------------------------------------
    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        columns = list(BASE_COLUMNS)
        for row in history:
            columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in history:
            writer.writerow({k: _fmt(row.get(k)) for k in columns})
        atomic_write_text(self.path / "metrics.csv", buf.getvalue())

    def write_log(self, header: list[str], history: list[dict[str, Any]], footer: list[str] = ()) -> None:
        lines = list(header) + [format_epoch_line(r) for r in history] + list(footer)
        atomic_write_text(self.path / "log.txt", "\n".join(lines) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2, sort_keys=False) + "\n")


class RunDirLock:
    """An exclusive lock on a run directory for the life of one training process.

    ``DIR/.lock`` holds the owner's pid under an flock: the kernel drops the flock when its
    process dies, so a lock left by a killed run never blocks ``--resume``, while a live owner
    makes a second process fail with ``DIR is in use by process N`` before it reads or writes
    anything else in DIR."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = self.path / LOCK_NAME
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> None:
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise RunDirError(f"{self.path} is in use by process {owner}") from None
            # the previous owner may have unlinked the file between our open and our flock:
            # then we hold a lock on a dead inode, so start again on the current file
            try:
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.file.unlink(missing_ok=True)  # unlink while still holding the flock (see acquire)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        if self.created and not any(self.path.iterdir()):
            self.path.rmdir()  # a run refused before writing leaves no empty folder behind

    def __enter__(self) -> "RunDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def format_epoch_line(r: dict[str, Any]) -> str:
    val = "" if r.get("val_acc") is None else f" | val loss {r['val_loss']:.4f} acc {100 * r['val_acc']:.2f}%"
    return (f"epoch {r['epoch']:>4} | lr {r['lr']:.3g} | train loss {r['train_loss']:.4f} "
            f"acc {100 * r['train_acc']:.2f}%{val} | {r['epoch_time_s']:.1f}s {r['images_per_s']:.0f} img/s")
