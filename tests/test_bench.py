"""The benchmark command on a tiny scale (its timings are not checked: speed is measured by the
command itself, never by tests): the scales' counts, the synthetic data, what the report holds,
--batches extrapolation and --convert against the run's own JSON, the reference's memory plan
and graph cache, the saved dataset of the reference's child process, and a child that dies."""
import contextlib
import io
import json
import math
import signal
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse as sp

from lirdrec_jax import bench, model_inputs, synthetic
from lirdrec_jax.parity import common

# A made-up GEMM rate (FLOP/s) for the command's runs: measuring the real one takes two rounds
# of large matmuls, and its value is not checked.
GEMM_RATE = 5e10


def test_scales_hold_mmrecs_counts():
    # (users, items, interactions): MMRec's evaluation/README.md for the Amazon datasets,
    # MicroLens-100K's published counts.
    assert bench.SCALES['elec'] == (192403, 63001, 1689188)
    assert bench.SCALES['microlens'] == (100000, 19738, 719405)
    assert bench.SCALES['baby'] == (19445, 7050, 160792)
    assert bench.SCALES['sports'] == (35598, 18357, 296337)
    assert bench.SCALES['clothing'] == (39387, 23033, 278677)
    assert (bench.IMAGE_DIM, bench.TEXT_DIM) == (4096, 384)


def test_candidate_items_switch_above_candidate_pairs():
    assert bench.CANDIDATE_PAIRS == 10 ** 9
    assert bench.candidate_items_for(10 ** 5, 10 ** 4) == 0  # exactly 1e9 pairs: all items
    assert bench.candidate_items_for(10 ** 5 + 1, 10 ** 4) == bench.CANDIDATE_ITEMS == 2048
    # Elec (12.1e9 pairs) and MicroLens (1.97e9) draw from candidates; Clothing (0.907e9), the
    # largest Amazon scale below them, from all items.
    by_scale = {s: bench.candidate_items_for(u, i) for s, (u, i, _) in bench.SCALES.items()}
    assert {s for s, c in by_scale.items() if c} == {'elec', 'microlens'}


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


# ----------------------------------------------------------------------------------------------
# The command at tiny scale, first batch of each epoch timed, with --convert
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """(printed report, JSON result) of `--scale tiny --epochs 1 --batches 1 --convert`."""
    out = tmp_path_factory.mktemp('bench') / 'bench.json'
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(bench, 'gemm_rate', lambda dtype='float32', **kwargs: GEMM_RATE)
        bench.main(['--scale', 'tiny', '--epochs', '1', '--batches', '1', '--convert',
                    '--json', str(out)])
    return printed.getvalue(), json.loads(out.read_text())


def test_bench_command_reports_every_quantity(tiny_run):
    text, result = tiny_run
    for what in ('compile the training program', 'training epoch', 'evaluation valid + test',
                 'peak host RSS', 'peak device memory', 'parameters', 'floor', 'epoch / floor',
                 'On a GPU/TPU'):
        assert what in text, what
    assert result['params'] > 0 and result['epoch_over_floor'] > 0
    assert result['options']['spmm_impl'] == 'bcoo'  # the repository's defaults
    # The floor: the analytic FLOPs of the epoch at the (here made-up) GEMM rate.
    assert result['gemm_gflops_float32'] == GEMM_RATE / 1e9
    assert result['floor_seconds_float32'] == pytest.approx(
        result['gflop_per_epoch'] * 1e9 / GEMM_RATE, rel=1e-12)
    # Every phase with its peak RSS, printed in the order they ran.
    phases = ('generate', 'convert_write', 'convert_load', 'model_inputs', 'prepare',
              'frozen_inputs', 'setup', 'epoch_inputs', 'compile', 'train', 'evaluate')
    assert sorted(result['phases']) == sorted(phases)
    assert all(result['phases'][p]['peak_rss_bytes'] > 0 for p in phases)
    after = text.split('-' * 70 + '\n', 1)[1].splitlines()
    table = after[:next(i for i, line in enumerate(after) if not line or line[0] == '(')]
    assert [line[:44].strip() for line in table] == [bench.PHASE_LABELS[p] for p in phases]


def test_batches_time_the_first_batches_and_extrapolate_the_epoch(tiny_run):
    text, r = tiny_run
    users, items, interactions = bench.SCALES['tiny']
    assert (r['users'], r['items'], r['interactions']) == (users, items, interactions)
    assert r['candidate_items'] == 0
    n = math.ceil(r['train_rows'] / 2048)  # LIRDRec's default batch of 2048 rows
    assert r['batch_size'] == 2048 and r['n_batches'] == n and n >= 2
    assert r['batches_timed'] == 1 and r['epoch_extrapolated'] is True
    (measured,) = r['epoch_measured_seconds']
    assert r['epoch_seconds'] == [n * measured]  # n / 1 x the first batch, exactly
    assert r['epoch_min_seconds'] == n * measured and r['batch_seconds'] == measured
    assert r['eval_repeats'] == 0  # with --batches: one evaluation
    assert f'training: the first 1 of {n} batches of each epoch timed, the epoch ' \
           f'extrapolated x{n:.1f}' in text
    assert f'training epoch, extrapolated x{n:.1f} (s)' in text


def test_convert_reports_written_bytes_and_the_scales_counts(tiny_run):
    text, r = tiny_run
    users, items, interactions = bench.SCALES['tiny']
    c = r['convert']
    assert c['loaded'] == [users, items, interactions]
    # The .inter text of the same (seeded) data, and two float32 .npy files (128-byte header).
    inter = synthetic.format_inter(bench.generate(users, items, interactions)).encode('utf-8')
    npy = lambda d: 128 + 4 * items * d
    assert c['written_bytes'] == len(inter) + npy(bench.IMAGE_DIM) + npy(bench.TEXT_DIM)
    assert c['cache_bytes'] > 0
    assert f'loaded {users} users, {items} items, {interactions} interactions' in text


# ----------------------------------------------------------------------------------------------
# The reference's kNN graph: memory plan and cache file
# ----------------------------------------------------------------------------------------------

def test_dense_knn_plan_needs_the_matrix_its_top_k_the_features_and_a_margin():
    n, features = 63001, 63001 * (4096 + 384) * 4  # Elec: 1,128,977,920 feature bytes
    # The matrix: 4 n^2 = 15,876,504,004 bytes (14.79 GiB), 1.5 x that with torch.topk's
    # working memory = 23,814,756,006; + 3 x the features + 1 GiB = 28,275,431,590 (26.33 GiB).
    need = 23814756006 + 3 * 1128977920 + 2 ** 30
    assert need == 28275431590
    build, why = common.dense_knn_plan(n, features, 'auto', available=need)
    assert build and '(14.79 GiB)' in why and 'need about 26.33 GiB' in why
    build, why = common.dense_knn_plan(n, features, 'auto', available=need - 1)
    assert not build
    assert why.startswith('not built by the reference: its dense 63001 x 63001 float32 '
                          'similarity (14.79 GiB)') and 'need about 26.33 GiB, 26.33 GiB ' \
        'available' in why
    assert common.dense_knn_plan(n, features, 'build', available=0)[0] is True
    assert common.dense_knn_plan(n, features, 'ours', available=10 * need)[0] is False
    with pytest.raises(ValueError, match="'dense'"):
        common.dense_knn_plan(n, features, 'dense')


def test_graph_cache_is_the_scipy_matrix_as_a_torch_sparse_tensor(tmp_path):
    torch = pytest.importorskip('torch')
    # A repeated entry (0, 2) is summed, as in scipy.
    matrix = sp.coo_matrix((np.array([0.5, 0.25, 1.5, 2.0]),
                            (np.array([0, 0, 2, 3]), np.array([2, 2, 1, 0]))), shape=(4, 5))
    common.write_graph_cache(tmp_path / 'graph.pt', matrix)
    tensor = torch.load(tmp_path / 'graph.pt')
    assert tensor.is_sparse and tensor.is_coalesced() and tensor.dtype == torch.float32
    assert tuple(tensor.shape) == (4, 5) and tensor._nnz() == 3
    dense = np.zeros((4, 5), np.float32)
    dense[0, 2], dense[2, 1], dense[3, 0] = 0.75, 1.5, 2.0
    np.testing.assert_array_equal(tensor.to_dense().numpy(), dense)


# ----------------------------------------------------------------------------------------------
# The reference's child process
# ----------------------------------------------------------------------------------------------

def test_saved_dataset_round_trips_with_extra_inputs(tmp_path):
    ds = synthetic.to_dataset(synthetic.generate_exact_counts(40, 20, 300, image_dim=6,
                                                              text_dim=4), 'saved')
    words = sp.random(40, 30, density=0.2, format='csr', dtype=np.float32, random_state=0)
    dense = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
    ds = ds._replace(text_feat=None,  # an absent modality stays absent
                     extra=model_inputs.as_mapping({'words_file': words, 'rows_file': dense}))
    bench.save_dataset(tmp_path, ds)
    back = bench.load_saved_dataset(tmp_path)
    assert (back.name, back.n_users, back.n_items) == ('saved', 40, 20)
    for split in ('train', 'valid', 'test'):
        for field in ('users', 'items'):
            np.testing.assert_array_equal(getattr(getattr(back, split), field),
                                          getattr(getattr(ds, split), field))
    np.testing.assert_array_equal(back.image_feat, ds.image_feat)
    assert back.text_feat is None
    assert sorted(back.extra) == ['rows_file', 'words_file']
    assert sp.isspmatrix_csr(back.extra['words_file'])
    assert (back.extra['words_file'] != words).nnz == 0
    assert isinstance(back.extra['rows_file'], np.ndarray)
    np.testing.assert_array_equal(back.extra['rows_file'], dense)


# A checkout with the files the reference's benchmark imports, whose model dies in its
# constructor as the kernel's out-of-memory killer would end it (SIGKILL): after the data
# loaders, before the model exists.
KILLED_CHECKOUT = {
    'src/models/freedom.py': '''
        import os
        import signal


        class FREEDOM:
            def __init__(self, config, dataloader):
                os.kill(os.getpid(), signal.SIGKILL)
        ''',
    'src/common/trainer.py': '''
        class Trainer:
            pass
        ''',
    'src/utils/topk_evaluator.py': '''
        class TopKEvaluator:
            pass
        ''',
    'src/utils/metrics.py': '',
    'src/utils/dataset.py': '''
        class RecDataset:
            def __init__(self, config, df=None):
                self.df = df
        ''',
    'src/utils/dataloader.py': '''
        class TrainDataLoader:
            def __init__(self, config, dataset, batch_size=1, shuffle=False):
                self.dataset = dataset


        class EvalDataLoader:
            def __init__(self, config, dataset, additional_dataset=None, batch_size=1):
                self.dataset = dataset
        ''',
}


def reference_folder(tmp_path, checkout, config='freedom'):
    """What --reference gives its child process (`write_reference_inputs`) for `checkout`."""
    ds = bench.synthetic_dataset(30, 20, 200, image_dim=6, text_dim=4, name='tiny')
    args = bench.parse_args(['--config', config, '--reference', str(checkout), '--epochs', '1',
                             '--batches', '1'])
    (tmp_path / 'child').mkdir()
    return bench.write_reference_inputs(ds, bench.bench_config(args), args, tmp_path / 'child')


def test_a_reference_child_that_is_killed_reports_the_phases_it_finished(tmp_path, capfd):
    for module in ('torch', 'torch_dct', 'pandas'):  # the parity extra (.ci/run installs it)
        pytest.importorskip(module)
    checkout = tmp_path / 'FREEDOM'
    for relative, text in KILLED_CHECKOUT.items():
        (checkout / relative).parent.mkdir(parents=True, exist_ok=True)
        (checkout / relative).write_text(textwrap.dedent(text).lstrip())
    folder = reference_folder(tmp_path, checkout)
    result = bench.run_reference_child(folder, 123)
    assert result['failed'] == ('the reference process ended with killed by signal '
                                f'{int(signal.SIGKILL)} (SIGKILL: out of memory?)')
    assert list(result['phases']) == ['loaders'] and result['parent_rss_bytes'] == 123
    assert result['phases']['loaders']['peak_rss_bytes'] > 0
    assert 'Traceback' not in capfd.readouterr().err
    section = bench._reference_section({'batch_seconds': 1.0}, result)
    assert 'data loaders' in section and 'the phases above are the ones it finished' in section
    assert 'in a child process' in section


@pytest.mark.parametrize('config, checkout, message', [
    # DGVAE's parity module has no benchmark hook: the child's one error line.
    ('dgvae', None, 'error: --reference needs lirdrec_jax.parity.dgvae.run_reference_benchmark'),
    # Not a checkout of the reference.
    ('freedom', 'nowhere', 'src/models/freedom.py not found'),
])
def test_a_reference_child_that_fails_is_reported_failed(tmp_path, capfd, config, checkout,
                                                         message):
    if checkout:  # the parity module's reference loader imports torch
        pytest.importorskip('torch')
    folder = reference_folder(tmp_path, tmp_path / (checkout or 'unused'), config)
    result = bench.run_reference_child(folder, None)
    assert result == {'failed': 'the reference process ended with exit status 1', 'phases': {},
                      'process': 'child',
                      'parent_rss_bytes': None}
    # A user's mistake: one error line from the child, no traceback.
    err = capfd.readouterr().err
    assert message in err and 'Traceback' not in err, err[-1500:]


def test_a_reference_folder_that_does_not_exist_is_refused_before_any_work(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(bench, 'generate', lambda *a, **k: pytest.fail('data was generated'))
    args = bench.parse_args(['--scale', 'tiny', '--reference', str(tmp_path / 'none')])
    with pytest.raises(SystemExit, match=f"error: --reference {tmp_path / 'none'}: no such "
                                         'folder'):
        bench.run_benchmark(args)


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
