"""Two JAX processes on this machine (jax.distributed over localhost, gloo collectives on the
CPU), each with two simulated devices, train the same small grid point as one process does,
with the same results. This is the multi-host path: every process loads the data and draws the
same batches, feeds its own devices, and only process 0 writes files."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import test as test_config
from lirdrec_jax import synthetic
from lirdrec_jax import experiment

REPO = Path(__file__).resolve().parents[1]


def experiment_config(data_dir, out_dir):
    cfg = test_config.get_config()
    cfg.data.data_dir, cfg.data.dataset = str(data_dir), 'small'
    cfg.checkpoint.output_dir, cfg.checkpoint.run_name = str(out_dir), 'run'
    cfg.train.epochs, cfg.train.stopping_step, cfg.train.batch_size = 2, 5, 90
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    data = tmp_path / 'data'
    synthetic.write_synthetic_dataset(data, 'small', n_users=150, n_items=90, seed=2,
                                      image_dim=24, text_dim=16)
    alone = experiment.run(experiment_config(data, tmp_path / 'one'))

    port = free_port()
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    env.pop('XLA_FLAGS', None)
    workers = [subprocess.Popen([sys.executable, 'tests/multidevice/two_process_worker.py',
                                 str(i), str(port), str(data), str(tmp_path / 'two')],
                                cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    for w in workers:
        try:
            outputs.append(w.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for other in workers:
                other.kill()
            pytest.fail('the two processes did not finish within 10 minutes')
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out[-4000:]
    assert 'process 1 of 2: 4 devices, finished=True' in outputs[1], outputs[1][-2000:]
    assert 'epoch ' not in outputs[1]  # only process 0 logs

    together = json.loads((tmp_path / 'two' / 'run' / 'results.json').read_text())
    point = lambda s: s['points'][0]
    assert point(together)['best_valid'] == point(alone)['best_valid']
    assert point(together)['best_test'] == point(alone)['best_test']
    losses = lambda root: [json.loads(l)['loss'] for l in
                           (root / 'run' / 'point-000' / 'metrics.jsonl').read_text().splitlines()]
    np.testing.assert_allclose(losses(tmp_path / 'two'), losses(tmp_path / 'one'), rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / 'two' / 'run' / 'point-000' / 'ckpt' / 'last')
                  .iterdir()) == ['1', '2']
