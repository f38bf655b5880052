"""A training run directory while ``ffn train`` writes it: its lock and what a failed run leaves.

The lock, ``OUT/train.lock`` (:func:`floodfilling.locks.acquire_file`), is taken by rank 0 once
the options are checked, before any volume is read, and held to the end of the run, so a second
training of the same directory fails at once naming the holder (a lock of a dead process is
taken over). Reading a locked directory's model (``init=OUT``, ``segment --model OUT``) needs no
lock: its files are replaced atomically.

A run that fails (an error, a NaN loss, Ctrl-C) leaves its directory as at its last checkpoint:
``metrics.csv`` keeps the rows up to the checkpoint's step (``metrics.png`` plotted again from
them) and the models kept by ``keep_every`` beyond it are removed, so that ``resume`` continues
from a consistent directory. A run that never reached a checkpoint (and resumed none) leaves
nothing it wrote: no ``metrics.csv``/``metrics.png``, no new ``tensorboard/``, ``checkpoint/`` or
``models/``, and no run directory when it created it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .. import disk, locks
from .checkpoints import CHECKPOINT_DIR, KEPT_DIR, STATE_FILE
from .metrics import METRICS_CSV, METRICS_PNG, read_metrics, save_plot, write_metrics

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"  # OUT/train.lock: held by rank 0 for the whole run


class RunDir:
    """The run directory ``out`` of one training: what it held before, its lock, the step of
    its last checkpoint and the models kept by this run (see the module docstring)."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.created = not self.out.is_dir()  # this run creates the directory
        top = self.out.absolute()
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        self.top = top  # the highest directory this run creates (out itself, or a parent)
        try:
            self.before = set() if self.created else {p.name for p in self.out.iterdir()}
        except OSError:  # unreadable: the lock (acquire) says so, naming the directory
            self.before = set()
        self.lock: Path | None = None
        self.checkpoint_step: int | None = None  # the step of the directory's checkpoint (None: none yet)
        self.writing = False  # set before the run writes its first file (until then a failure touches nothing)
        self.kept: list[tuple[int, Path]] = []  # (step, file) of the models this run kept

    def acquire(self) -> None:
        """Creates the directory and takes its lock (:class:`floodfilling.locks.LockError` when
        a live run holds it); nothing is left when that fails."""
        with disk.disk_errors(self.out):
            self.out.mkdir(parents=True, exist_ok=True)
        try:
            self.lock = locks.acquire_file(self.out / LOCK_FILE, f"run directory {self.out}", {"command": "train"})
        except BaseException:
            self._remove_if_created_and_empty()
            raise

    def finish(self, ok: bool) -> None:
        """After the run: a failed run's files put back to its last checkpoint (or removed), then
        the lock released."""
        try:
            if not ok and self.lock is not None and self.writing:  # (without the lock: another run's files)
                try:
                    self._restore()
                except Exception as exc:  # noqa: BLE001 - the run's own error is the one to report
                    log.warning("%s: could not put the run directory back to its last checkpoint: %s", self.out,
                                disk.os_error_text(exc, self.out) if isinstance(exc, OSError) else exc)
        finally:
            if self.lock is not None:
                locks.release(self.lock)
                self.lock = None
            self._remove_if_created_and_empty()

    def _restore(self) -> None:
        step = self.checkpoint_step
        for s, path in self.kept:
            if step is None or s > step:
                path.unlink(missing_ok=True)
        metrics, plot = self.out / METRICS_CSV, self.out / METRICS_PNG
        if step is None:
            for p in (metrics, plot):
                p.unlink(missing_ok=True)
            for name in (CHECKPOINT_DIR, KEPT_DIR, "tensorboard"):
                p = self.out / name
                if name not in self.before and p.is_dir() and not (p / STATE_FILE).exists():
                    shutil.rmtree(p, ignore_errors=True)
            log.info("%s: the run failed before its first checkpoint; removed what it wrote", self.out)
            return
        try:
            rows = read_metrics(metrics)
        except (OSError, ValueError) as exc:  # a damaged file: left as it is, for the user to see
            log.warning("could not read %s to drop its rows after step %d: %s", metrics, step, exc)
            return
        models = self.out / KEPT_DIR
        if KEPT_DIR not in self.before and models.is_dir() and not any(models.iterdir()):
            models.rmdir()
        kept = [r for r in rows if r["step"] <= step]
        if len(kept) != len(rows):
            write_metrics(metrics, kept)
            save_plot(plot, kept)
            log.info("%s: dropped %d row(s) after the checkpoint at step %d", metrics, len(rows) - len(kept), step)

    def _remove_if_created_and_empty(self) -> None:
        if not self.created:
            return
        d = self.out.absolute()
        while True:
            try:
                d.rmdir()  # only when empty
            except OSError:
                return
            if d == self.top or d.parent == d:
                return
            d = d.parent
