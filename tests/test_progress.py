"""Progress bars: shown on a terminal (forced here with LIRDREC_JAX_PROGRESS=1), absent in a log
file, and splitting an epoch's scan into dispatches for them changes no number."""
import json

import numpy as np
import pytest

from lirdrec_jax import progress, train
from tests.test_train import point_config, tiny_dataset

BATCH = 16  # 360 training rows of the tiny dataset: 23 batches, enough to be split


@pytest.fixture(scope='module')
def prepared():
    return train.prepare_data(tiny_dataset(), 'lirdrec')


@pytest.mark.parametrize('n, split, lengths', [
    (23, True, [3] * 7 + [2]), (100, True, [10] * 10), (19, True, [19]), (23, False, [23])])
def test_scan_chunks_cover_the_epoch_in_order(n, split, lengths):
    chunks = train.scan_chunks(n, split)
    assert [b - a for a, b in chunks] == lengths
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(b == c for (_, b), (c, _) in zip(chunks, chunks[1:]))
    assert len(set(lengths)) <= 2 and len(chunks) <= train.SCAN_CHUNKS


def run_records(prepared, workdirs, bars, monkeypatch, n_points):
    monkeypatch.setenv(progress.ENV, '1' if bars else '0')
    cfgs = [point_config(epochs=2, stopping_step=10, batch_size=BATCH, seed=(s,))
            for s in range(n_points)]
    train.train_points(cfgs, prepared, workdirs)
    out = []
    for workdir in workdirs:
        records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
        for r in records:
            del r['train_seconds'], r['eval_seconds']
        with np.load(workdir / 'test_users.npz') as users:
            out.append((records, {k: users[k].tolist() for k in users.files}))
    return out


@pytest.mark.parametrize('n_points', [1, 2])
def test_an_epoch_split_for_a_bar_gives_the_same_run(prepared, tmp_path, monkeypatch, n_points):
    """One point, and a vmapped group of two: losses, metrics and per-user values equal to the
    last bit with and without bars (with bars the 23 batches run as 8 scans)."""
    calls = []
    original = train.run_epoch

    def counting(fns, *args, **kwargs):
        epoch = fns.epoch
        fns = fns._replace(epoch=lambda *a: calls.append(1) or epoch(*a))
        return original(fns, *args, **kwargs)

    monkeypatch.setattr(train, 'run_epoch', counting)
    plain = run_records(prepared, [tmp_path / f'plain{i}' for i in range(n_points)], False,
                        monkeypatch, n_points)
    assert len(calls) == 2  # one scan per epoch
    calls.clear()
    split = run_records(prepared, [tmp_path / f'bars{i}' for i in range(n_points)], True,
                        monkeypatch, n_points)
    assert len(calls) == 2 * 8
    assert split == plain


def test_bars_on_a_terminal_one_line_per_epoch_in_a_log(prepared, tmp_path, monkeypatch,
                                                       capsys):
    monkeypatch.setattr(progress, 'DELAY_SECONDS', 0.0)
    cfg = point_config(epochs=2, stopping_step=10, batch_size=BATCH)
    monkeypatch.setenv(progress.ENV, '1')
    train.train_points([cfg], prepared, [tmp_path / 'tty'])
    shown = capsys.readouterr()
    assert 'epoch 0: 100%' in shown.err and '23/23' in shown.err and 'batch/s' in shown.err
    assert 'training: 100%' in shown.err and '2/2' in shown.err and 'evaluation' in shown.err
    assert sum(l.startswith('epoch ') for l in shown.out.splitlines()) == 2

    monkeypatch.setenv(progress.ENV, '0')
    train.train_points([cfg], prepared, [tmp_path / 'log'])
    logged = capsys.readouterr()
    assert logged.err == ''
    assert sum(l.startswith('epoch ') for l in logged.out.splitlines()) == 2
