"""Runs that never lose work: which run resumes, damaged and stale checkpoints, one writer per
run directory, metrics.jsonl, file-system failures."""
import errno
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import test as test_config
from lirdrec_jax import checkpointing, experiment, main, rundir, storage
from tests.conftest import write_small_dataset

EPOCHS = 5


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return write_small_dataset(tmp_path_factory.mktemp('data'))


def config(data_dir, out_dir, run_name='run', **changes):
    cfg = test_config.get_config()
    cfg.data.data_dir, cfg.data.dataset = str(data_dir), 'small'
    cfg.checkpoint.output_dir, cfg.checkpoint.run_name = str(out_dir), run_name
    cfg.train.epochs, cfg.train.stopping_step = EPOCHS, 100
    for dotted, value in changes.items():
        section, field = dotted.split('__')
        cfg[section][field] = value
    return cfg


@pytest.fixture(scope='module')
def interrupted(data_dir, tmp_path_factory):
    """A run stopped after 3 of its 5 epochs (checkpoints last/2, last/3; best/<=3), and the
    epoch records of the same run uninterrupted."""
    root = tmp_path_factory.mktemp('interrupted')
    experiment.run(config(data_dir, root / 'out'), stop_after_epochs=3)
    full = experiment.run(config(data_dir, root / 'full'))
    return root / 'out' / 'run', full


def copy_run(source, tmp_path):
    target = tmp_path / 'out' / 'run'
    shutil.copytree(source, target)
    return target


def epochs_in_metrics(run_dir):
    lines = (run_dir / 'point-000' / 'metrics.jsonl').read_text().splitlines()
    return [json.loads(line)['epoch'] for line in lines]


def resume(data_dir, run_dir, **kwargs):
    cfg = config(data_dir, run_dir.parent, run_name=run_dir.name, **kwargs)
    cfg.resume = True
    return experiment.run(cfg)


def same_result(resumed, full):
    a, b = resumed['points'][0], full['points'][0]
    assert a['best_epoch'] == b['best_epoch']
    for split in ('best_valid', 'best_test'):
        np.testing.assert_allclose([a[split][k] for k in sorted(a[split])],
                                   [b[split][k] for k in sorted(b[split])], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Which run resumes
# ----------------------------------------------------------------------------------------------

def test_bad_config_values_write_nothing(data_dir, tmp_path):
    for changes in ({'model__knn_k': 10_000}, {'optim__learning_rate': (0.0,)},
                    {'eval__topk': (5, 10_000)}):
        with pytest.raises(ValueError, match='config field'):
            experiment.run(config(data_dir, tmp_path / 'out', **changes))
        assert not (tmp_path / 'out').exists(), changes


def test_resume_picks_the_latest_run_with_a_checkpoint_and_says_which(
        data_dir, interrupted, tmp_path, capsys, training_log):
    source, full = interrupted
    root = tmp_path / 'out'
    older = root / 'lirdrec-small-20260101-000000'
    shutil.copytree(source, older)
    # Newer starts that failed before training (as earlier versions left them): config only.
    for name in ('lirdrec-small-20260102-000000', 'lirdrec-small-20260102-000000-1'):
        (root / name).mkdir()
        (root / name / 'config.json').write_text('{}')
    shutil.copytree(source, root / 'freedom-small-20260103-000000')  # another model
    cfg = config(data_dir, root, run_name='')
    cfg.resume = True
    capsys.readouterr()
    resumed = experiment.run(cfg)
    out = capsys.readouterr().out
    assert f'resuming run {older}: point 1 after epoch 2' in out
    assert training_log.epoch_numbers == [3, 4]  # only the epochs after the checkpoint
    same_result(resumed, full)
    assert epochs_in_metrics(older) == list(range(EPOCHS))


def test_named_run_holding_only_a_config_is_started(data_dir, tmp_path, training_log):
    run_dir = tmp_path / 'out' / 'run'
    run_dir.mkdir(parents=True)
    (run_dir / 'config.json').write_text(json.dumps({'model_name': 'something else'}))
    summary = experiment.run(config(data_dir, tmp_path / 'out', train__epochs=2))
    assert summary['finished'] and training_log.epoch_numbers == [0, 1]
    assert json.loads((run_dir / 'config.json').read_text())['model_name'] == 'lirdrec'


def test_named_run_holding_checkpoints_is_not_restarted(data_dir, interrupted, tmp_path):
    run_dir = copy_run(interrupted[0], tmp_path)
    with pytest.raises(FileExistsError, match='already holds a run'):
        experiment.run(config(data_dir, tmp_path / 'out'))


# ----------------------------------------------------------------------------------------------
# Damaged and stale checkpoints
# ----------------------------------------------------------------------------------------------

def garble(checkpoint_dir):
    for f in checkpoint_dir.rglob('*'):
        if f.is_file() and f.parent.name == 'd':
            f.write_bytes(b'not an array')


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(
        data_dir, interrupted, tmp_path, capsys, training_log):
    source, full = interrupted
    run_dir = copy_run(source, tmp_path)
    ckpt = run_dir / 'point-000' / 'ckpt'
    garble(ckpt / 'last' / '3')
    capsys.readouterr()
    resumed = resume(data_dir, run_dir)
    out = capsys.readouterr().out
    assert f'warning: checkpoint {ckpt / "last" / "3"} cannot be read' in out
    assert training_log.epoch_numbers == [2, 3, 4]
    same_result(resumed, full)
    assert (ckpt / 'unreadable' / 'last-3').is_dir()  # kept for inspection, not deleted
    assert epochs_in_metrics(run_dir) == list(range(EPOCHS))


def test_checkpoint_deleted_by_hand_leaves_no_stale_best(data_dir, interrupted, tmp_path,
                                                        training_log):
    source, full = interrupted
    run_dir = copy_run(source, tmp_path)
    ckpt = run_dir / 'point-000' / 'ckpt'
    # The test config improves every epoch on this data, so best/3 is the newest best.
    assert sorted(os.listdir(ckpt / 'best')) == ['3']
    shutil.rmtree(ckpt / 'last' / '3')
    same_result(resume(data_dir, run_dir), full)
    assert training_log.epoch_numbers == [2, 3, 4]
    assert (ckpt / 'superseded' / 'best-3').is_dir()


def test_no_readable_checkpoint_is_an_error_that_moves_nothing(data_dir, interrupted, tmp_path):
    run_dir = copy_run(interrupted[0], tmp_path)
    last = run_dir / 'point-000' / 'ckpt' / 'last'
    for step in ('2', '3'):
        garble(last / step)
    with pytest.raises(checkpointing.CheckpointError, match=r'last/3: .*; last/2: '):
        resume(data_dir, run_dir)
    assert sorted(os.listdir(last)) == ['2', '3']


# ----------------------------------------------------------------------------------------------
# metrics.jsonl
# ----------------------------------------------------------------------------------------------

def test_metrics_hold_each_epoch_once_after_any_resume(data_dir, interrupted, tmp_path):
    run_dir = copy_run(interrupted[0], tmp_path)
    metrics = run_dir / 'point-000' / 'metrics.jsonl'
    lines = metrics.read_text().splitlines()
    assert [json.loads(l)['epoch'] for l in lines] == [0, 1, 2]
    # A line written again by a run killed after it (earlier versions wrote the line before
    # the checkpoint), and a line lost by a run killed between checkpoint and line.
    metrics.write_text('\n'.join(lines[:2] + [lines[1]]) + '\n')
    resume(data_dir, run_dir)
    assert epochs_in_metrics(run_dir) == list(range(EPOCHS))


# ----------------------------------------------------------------------------------------------
# One writer per run directory
# ----------------------------------------------------------------------------------------------

def write_lock(run_dir, holder, age_seconds=0.0):
    path = run_dir / rundir.LOCK_NAME
    path.write_text(json.dumps(holder))
    stamp = time.time() - age_seconds
    os.utime(path, (stamp, stamp))
    return path


def finished_pid():
    child = subprocess.Popen([sys.executable, '-c', 'pass'])
    child.wait()
    return child.pid


def test_a_live_writer_locks_the_run_and_nothing_is_written(data_dir, interrupted, tmp_path):
    run_dir = copy_run(interrupted[0], tmp_path)
    holder = {'host': socket.gethostname(), 'pid': os.getppid(), 'since': 'now'}
    write_lock(run_dir, holder)
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob('*'))
    with pytest.raises(rundir.RunLockedError,
                       match=f'process {os.getppid()} on {socket.gethostname()}'):
        resume(data_dir, run_dir)
    after = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob('*'))
    assert after == before
    assert json.loads((run_dir / rundir.LOCK_NAME).read_text()) == holder


@pytest.mark.parametrize('holder, age, taken', [
    ({'host': 'here', 'pid': 'dead'}, 0.0, True),
    ({'host': 'here', 'pid': 'alive'}, 10_000.0, False),   # a live holder, however old
    ({'host': 'elsewhere', 'pid': 1}, rundir.STALE_SECONDS + 60, True),
    ({'host': 'elsewhere', 'pid': 1}, 10.0, False),         # refreshed recently
])
def test_stale_locks_are_taken_over_and_live_ones_refused(tmp_path, holder, age, taken):
    host = socket.gethostname() if holder['host'] == 'here' else 'another-machine'
    pid = {'dead': finished_pid(), 'alive': os.getppid()}.get(holder['pid'], holder['pid'])
    write_lock(tmp_path, {'host': host, 'pid': pid}, age)
    notes = []
    lock = rundir.RunLock(tmp_path, notes.append)
    if not taken:
        with pytest.raises(rundir.RunLockedError):
            lock.acquire()
        return
    with lock:
        assert json.loads((tmp_path / rundir.LOCK_NAME).read_text())['pid'] == os.getpid()
        assert len(notes) == 1 and notes[0].startswith('note: took over the lock')
    assert not (tmp_path / rundir.LOCK_NAME).exists()  # released on exit


def test_the_lock_is_released_when_the_run_fails(data_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError('failure inside the run')

    monkeypatch.setattr(experiment, '_train_run', fail)
    with pytest.raises(RuntimeError, match='failure inside the run'):
        experiment.run(config(data_dir, tmp_path / 'out'))
    assert not (tmp_path / 'out' / 'run' / rundir.LOCK_NAME).exists()


# ----------------------------------------------------------------------------------------------
# File-system failures
# ----------------------------------------------------------------------------------------------

TENSORSTORE_DISK_FULL = (
    'RESOURCE_EXHAUSTED: Error writing "params.x/0" in OCDBT database at local file "{d}.orbax-'
    'checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: "{d}.orbax-'
    'checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/ab12": Failed to write 1865603 '
    "bytes to file 17: No space left on device [os_error_code='28']")


@pytest.mark.parametrize('err, reason, path', [
    (ValueError(TENSORSTORE_DISK_FULL.format(d='/r/ckpt/last/2')), 'the disk is full',
     '/r/ckpt/last/2'),
    (OSError(errno.EROFS, 'Read-only file system', '/r/config.json'),
     'the file system is read-only', '/r/config.json'),
    (PermissionError(errno.EACCES, 'Permission denied', '/r'), 'permission denied', '/r'),
])
def test_file_system_failures_become_one_message(err, reason, path):
    with pytest.raises(storage.StorageError) as caught:
        with storage.translated('choose another folder'):
            raise err
    fix = 'free space' if 'full' in reason else 'make it writable'
    assert str(caught.value) == f'cannot write {path}: {reason}; {fix} or choose another folder'


def test_other_errors_pass_through_translation():
    for err in (ValueError('config field x'), OSError(errno.ENOENT, 'No such file', 'f')):
        with pytest.raises(type(err)) as caught:
            with storage.translated('x'):
                raise err
        assert caught.value is err


def test_disk_full_while_saving_keeps_earlier_checkpoints(data_dir, tmp_path, monkeypatch,
                                                          training_log):
    """The second epoch's save fails as orbax does on a full disk; the first checkpoint stays
    intact and the run resumes from it."""
    saves = []
    real_save = checkpointing.RunCheckpoints.save

    def save(self, epoch, *args, **kwargs):
        saves.append(epoch)
        if epoch == 2:
            raise ValueError(TENSORSTORE_DISK_FULL.format(d=self.directory / 'last' / '2'))
        return real_save(self, epoch, *args, **kwargs)

    monkeypatch.setattr(checkpointing.RunCheckpoints, 'save', save)
    run_dir = tmp_path / 'out' / 'run'
    expected = f'cannot write {run_dir}/point-000/ckpt/last/2: the disk is full; free space or'
    with pytest.raises(storage.StorageError, match=re.escape(expected)):
        experiment.run(config(data_dir, tmp_path / 'out'))
    assert not (run_dir / rundir.LOCK_NAME).exists()
    monkeypatch.setattr(checkpointing.RunCheckpoints, 'save', real_save)
    training_log.clear()
    resume(data_dir, run_dir)
    assert training_log.epoch_numbers == [1, 2, 3, 4]
    assert epochs_in_metrics(run_dir) == list(range(EPOCHS))


def test_orbax_log_records_are_dropped_and_others_kept():
    keep = main._DropOrbaxRecords()
    record = lambda path: logging.LogRecord('absl', logging.ERROR, path, 1, 'm', None, None)
    assert not keep.filter(record('/venv/site-packages/orbax/checkpoint/_src/x.py'))
    assert keep.filter(record('/work/lirdrec_jax/train.py'))
