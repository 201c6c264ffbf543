"""One process per run directory: two commands with the same ``run_name`` would interleave their metrics and
overwrite each other's checkpoints and records.

The lock is an exclusive ``flock`` on ``<run dir>/.lock``, which holds the owner's pid, host, start time and
command for the message a second process shows. The kernel releases a flock when its process dies, however
it dies, so a lock file left by a killed process is stale by construction and is taken over with a note.
"""

import fcntl
import json
import os
import socket
from datetime import datetime
from functools import wraps
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only

from lightning_ldm.errors import UserError
from lightning_ldm.tasks.run_dir import command


class RunInUseError(UserError):
    """Another process works in this run directory."""


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fd = None

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                owner = self._owner()
                raise RunInUseError(
                    f"{self.path.parent} is in use by pid {owner.get('pid', '?')} on {owner.get('host', '?')} "
                    f"(since {owner.get('time', '?')}: {owner.get('command', '?')}); wait for it to end, or "
                    "choose another run_name") from None
            try:  # the holder may have removed the file between our open and our flock: lock the file that is there
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = self._owner()
        if stale:
            print(f"Run lock: taking over {self.path} from pid {stale.get('pid')} on {stale.get('host')}, which "
                  "ended without releasing it")
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "time": datetime.now().isoformat(timespec="seconds"),
                 "command": command()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holds_run_lock(task):
    """Decorate a task ``run(cfg)``: rank zero holds the run directory's lock while it runs (the other ranks of
    a multi-process job are the same run)."""
    @wraps(task)
    def locked(cfg):
        if rank_zero_only.rank != 0:
            return task(cfg)
        with RunLock(Path(cfg.paths.run_dir)):
            return task(cfg)
    return locked
