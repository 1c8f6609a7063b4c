"""Run directories: what a run has done so far, which run to resume, and one writer per run.

A run directory is `<output_dir>/<model>-<dataset>-<YYYYMMDD>-<HHMMSS>[-N]` (or a name the user
chose); its points are `point-NNN/` with orbax checkpoints under `ckpt/last/<epochs done>/` and
`result.json` once finished (experiment.py has the whole layout).

One process writes a run directory at a time: `RunLock` holds `<run>/run.lock`, a small JSON
file naming the holder's host and pid. A lock whose holder is gone (same host, process no
longer running, or not refreshed for `STALE_SECONDS` when the holder is another machine, e.g. a
Colab runtime that was disconnected) is taken over with a note; a live holder is an error.
"""
import datetime
import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Optional

LOCK_NAME = 'run.lock'
# Per-user test metrics of a point at its best valid epoch (written when the point finishes);
# while it trains, the candidates of its best epochs so far are `test_users.epoch-NNNNN.npz`.
TEST_USERS_FILE = 'test_users.npz'
TEST_USERS_CANDIDATE = 'test_users.epoch-'
# The holder refreshes the lock's modification time every HEARTBEAT_SECONDS; a lock of another
# host not refreshed for STALE_SECONDS is taken over.
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0


class RunLockedError(FileExistsError):
    """Another live process writes this run directory."""


def run_prefix(model_name: str, dataset: str) -> str:
    return f'{model_name}-{dataset}'


def _is_run_name(name: str, prefix: str) -> bool:
    return re.fullmatch(re.escape(prefix) + r'-\d{8}-\d{6}(-\d+)?', name) is not None


def checkpoint_epochs(point_dir: Path) -> list:
    """The epochs (1-based counts of epochs done) of the point's complete `last` checkpoints,
    ascending (orbax's unfinished saves end in `.orbax-checkpoint-tmp` and are not counted)."""
    last = Path(point_dir) / 'ckpt' / 'last'
    if not last.is_dir():
        return []
    return sorted(int(p.name) for p in last.iterdir() if p.name.isdigit())


def point_states(run_dir: Path) -> Dict[str, str]:
    """{point folder: 'finished' | 'after epoch N' | 'not started'} of a run directory."""
    states = {}
    for point_dir in sorted(Path(run_dir).glob('point-[0-9][0-9][0-9]')):
        epochs = checkpoint_epochs(point_dir)
        if (point_dir / 'result.json').exists():
            states[point_dir.name] = 'finished'
        elif epochs:
            # The epoch index of the checkpoint, as progress lines count epochs (from 0).
            states[point_dir.name] = f'after epoch {epochs[-1] - 1}'
        else:
            states[point_dir.name] = 'not started'
    return states


def holds_work(run_dir: Path) -> bool:
    """Whether the run directory holds anything a new start would lose: a checkpoint or a
    result. A directory with only config files (a start that failed early) holds none."""
    return any(state != 'not started' for state in point_states(run_dir).values())


def latest_resumable(root: Path, model_name: str, dataset: str) -> Optional[Path]:
    """The newest run of this model and dataset under `root` that holds work (see
    `holds_work`), by the timestamp in its name; None if there is none."""
    prefix = run_prefix(model_name, dataset)
    if not Path(root).is_dir():
        return None
    runs = sorted((p for p in Path(root).iterdir() if p.is_dir() and _is_run_name(p.name, prefix)),
                  key=lambda p: [int(x) for x in p.name[len(prefix) + 1:].split('-')])
    for run in reversed(runs):
        if holds_work(run):
            return run
    return None


def describe_states(states: Dict[str, str]) -> str:
    """'point 1 after epoch 7, point 2 finished' (points numbered from 1, as progress lines)."""
    return ', '.join(f'point {int(name[len("point-"):]) + 1} {state}'
                     for name, state in states.items())


# ----------------------------------------------------------------------------------------------
# One writer per run directory
# ----------------------------------------------------------------------------------------------

def _process_start(pid: int) -> Optional[str]:
    """The start time of process `pid` (Linux /proc), to tell a reused pid from the holder."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _me() -> dict:
    return {'host': socket.gethostname(), 'pid': os.getpid(),
            'pid_start': _process_start(os.getpid()),
            'since': datetime.datetime.now().isoformat(timespec='seconds')}


def stale_reason(holder: Optional[dict], age_seconds: float) -> Optional[str]:
    """Why the lock of `holder` (the lock file's JSON, None if unreadable) no longer protects a
    running process, or None if its holder may still be running."""
    if holder is None:
        return 'its lock file is unreadable' if age_seconds > HEARTBEAT_SECONDS else None
    if holder.get('host') == socket.gethostname():
        pid = int(holder.get('pid', -1))
        if not _alive(pid):
            return f'process {pid} no longer runs'
        start = holder.get('pid_start')
        if start is not None and _process_start(pid) not in (None, start):
            return f'process {pid} no longer runs (its pid was reused)'
        return None
    if age_seconds > STALE_SECONDS:
        return f'the lock of {holder.get("host")} was not refreshed for {age_seconds:.0f} s'
    return None


def _read_lock(path: Path) -> tuple:
    """(holder dict or None, the file's age in seconds); FileNotFoundError if it is gone."""
    age = time.time() - path.stat().st_mtime
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError):
        return None, age
    return (holder if isinstance(holder, dict) else None), age


class RunLock:
    """`with RunLock(run_dir, log):` the one writer of `run_dir` (see the module docstring).

    Raises RunLockedError when a live process holds the lock.
    """

    def __init__(self, run_dir: Path, log: Callable[[str], None] = print):
        self.path = Path(run_dir) / LOCK_NAME
        self.log = log
        self.holder = _me()
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> 'RunLock':
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, 'w') as f:
                json.dump(self.holder, f)
            self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                            name='run-lock-heartbeat')
            self._thread.start()
            return
        raise RunLockedError(f'cannot lock {self.path}: other processes keep taking it')

    def _take_over_if_stale(self) -> None:
        try:
            holder, age = _read_lock(self.path)
        except FileNotFoundError:
            return  # released meanwhile: try again
        reason = stale_reason(holder, age)
        if reason is None:
            who = (f'process {holder.get("pid")} on {holder.get("host")} (since '
                   f'{holder.get("since")})' if holder else 'another process')
            raise RunLockedError(
                f'{self.path.parent} is being written by {who}; one run directory has one '
                f'writer: wait for that run to end, resume a different run with '
                f'--config.checkpoint.run_name, or, if that process no longer runs, delete '
                f'{self.path}')
        # Move the stale lock aside under a name of our own, then check that it is still the
        # one judged stale (another process may have taken over in between).
        aside = self.path.with_name(f'{LOCK_NAME}.stale-{os.getpid()}')
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if moved != holder:
            if not self.path.exists():
                os.replace(aside, self.path)
            raise RunLockedError(f'{self.path.parent} was just locked by another process')
        aside.unlink()
        self.log(f'note: took over the lock of {self.path.parent}: {reason}')

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        try:
            holder, _ = _read_lock(self.path)
        except FileNotFoundError:
            return
        if holder == self.holder:
            try:
                self.path.unlink()
            except OSError:
                pass
