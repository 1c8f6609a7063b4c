"""The benchmark command on a tiny scale (its timings are not checked: speed is measured by the
command itself, never by tests)."""
import json
import sys

import numpy as np
import pytest

from lirdrec_jax import bench, synthetic


def test_synthetic_dataset_has_the_requested_counts():
    # bench.synthetic_dataset is this call (more in tests/test_synthetic.py).
    ds = synthetic.to_dataset(synthetic.generate_exact_counts(300, 120, 2000, image_dim=16,
                                                              text_dim=8), 'bench')
    total = sum(s.users.size for s in (ds.train, ds.valid, ds.test))
    assert (ds.n_users, ds.n_items, total) == (300, 120, 2000)
    assert ds.image_feat.shape == (120, 16) and (ds.image_feat >= 0).all()
    per_user = {}
    for s in (ds.train, ds.valid, ds.test):
        for u, i in zip(s.users, s.items):
            per_user.setdefault(int(u), set()).add(int(i))
    assert min(len(v) for v in per_user.values()) >= 5  # 5+ distinct items per user
    # Each user's latest rows: round-half-up(n / 10) test rows and as many valid ones, at least
    # one each (MMRec's per-user 8:1:1 split).
    rows = np.bincount(np.concatenate([s.users for s in (ds.train, ds.valid, ds.test)]),
                       minlength=300)
    expected = np.maximum(1, (rows + 5) // 10)
    for split in (ds.valid, ds.test):
        np.testing.assert_array_equal(np.bincount(split.users, minlength=300), expected)
    assert expected.sum() > 300  # some users have 15+ rows, so more than one of each


def test_bench_command_reports_every_quantity(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    bench.main(['--scale', 'tiny', '--epochs', '1', '--json', str(out)])
    text = capsys.readouterr().out
    for what in ('compile the training program', 'training epoch', 'evaluation valid + test',
                 'peak host RSS', 'peak device memory', 'parameters', 'floor', 'epoch / floor',
                 'On a GPU/TPU'):
        assert what in text, what
    result = json.loads(out.read_text())
    assert result['params'] > 0 and result['epoch_over_floor'] > 0
    assert result['options']['spmm_impl'] == 'bcoo'  # the repository's defaults


def test_reference_hook_without_the_parity_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'lirdrec_jax.parity.lirdrec', None)
    args = bench.parse_args(['--reference', '/nowhere'])
    with pytest.raises(SystemExit, match='lirdrec_jax.parity.lirdrec.run_reference_benchmark'):
        bench._reference(args, None, bench.bench_config(args))


def test_fast_flag_gives_the_fast_config_variant():
    from configs import lirdrec as lirdrec_config
    from lirdrec_jax import grid
    cfg = bench.bench_config(bench.parse_args(['--fast']))
    assert cfg.to_dict() == grid.expand_grid(lirdrec_config.get_config('fast'))[0].config.to_dict()
    bf16 = bench.bench_config(bench.parse_args(['--fast', '--matmul_dtype', 'bfloat16']))
    assert (bf16.graph.spmm_impl, bf16.model.transposed_features, bf16.model.cpu_dot) == \
        ('segment_sum', True, 'xla')
