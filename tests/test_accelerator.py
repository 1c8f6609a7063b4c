"""The accelerator command on the CPU at tiny scale: its files, failures, a killed run's files,
the sweep comparison and the reference's skip line (timings are never checked)."""
import functools
import json

import pytest
from jax.errors import JaxRuntimeError

from lirdrec_jax import accelerator, bench

MODELS = ('freedom', 'mllmrec')  # the two quickest to compile


def table(markdown: str, first_header: str = 'model') -> list:
    """The rows of the Markdown table whose header starts with `first_header`, as lists of
    cells."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f'| {first_header} |'))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        rows.append([c.strip() for c in line.strip().strip('|').split('|')])
    return rows


def small_gemm(monkeypatch):
    # The GEMM rate of a 256 x 256 matmul: the same measurement, seconds cheaper on this CPU.
    monkeypatch.setattr(bench, 'gemm_rate', functools.partial(bench.gemm_rate, n=256))


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    small_gemm(mp)
    out = tmp_path_factory.mktemp('accelerator')
    references = tmp_path_factory.mktemp('references')
    for repo in ('FREEDOM', 'MLLMRec'):
        (references / repo).mkdir()
    try:
        record = accelerator.main(['--out', str(out), '--models', ','.join(MODELS),
                                   '--scales', 'tiny', '--epochs', '1', '--sweep_scale', 'tiny',
                                   '--sweep_points', '2', '--references', str(references)])
    finally:
        mp.undo()
    return out, record


def test_every_cell_is_one_row_whose_numbers_are_the_json_ones(tiny_run):
    out, record = tiny_run
    saved = json.loads((out / accelerator.JSON_FILE).read_text())
    assert saved['finished'] and saved['n_cells'] == 4
    assert [(c['model'], c['dtype'], c['status']) for c in saved['cells']] == [
        (m, d, 'ok') for m in MODELS for d in ('float32', 'bfloat16')]
    rows = table((out / accelerator.MARKDOWN_FILE).read_text())
    assert len(rows) == 4
    for row, cell in zip(rows, saved['cells']):
        r = cell['result']
        assert row[:3] == [cell['model'], 'tiny', cell['dtype']]
        assert r['scale'] == 'tiny' and r['options']['scan_epoch']
        assert r['epoch_extrapolated'] is False  # tiny: every batch timed
        assert float(row[3]) == pytest.approx(r['epoch_min_seconds'], abs=5e-4)
        assert float(row[4]) == pytest.approx(1000 * r['batch_seconds'], abs=5e-3)
        assert float(row[5]) == pytest.approx(r['eval_seconds'], abs=5e-4)
        assert row[6] == '—'  # the CPU reports no device memory
        assert float(row[7]) == pytest.approx(r['epoch_over_floor'], abs=5e-3)
        assert row[8] == '—'  # no reference ran
        assert r['eval_repeats'] == accelerator.EVAL_REPEATS
        assert r['batches_timed'] == r['n_batches']
    # The data was made once for the scale; the second dtype of a model reused its preparation.
    assert 'generate' in saved['cells'][0]['result']['phases']
    assert saved['cells'][1]['result']['reused'] == ['generate', 'model_inputs', 'prepare']
    assert saved['cells'][2]['result']['reused'] == ['generate']


def test_sweep_compares_the_vmapped_group_with_its_points_one_by_one(tiny_run):
    _, record = tiny_run
    by_model = {s['model']: s for s in record['sweeps']}
    freedom = by_model['freedom']
    assert freedom['points'] == 2 and len(freedom['sequential_epoch_seconds']) == 2
    assert freedom['speedup'] > 0
    assert freedom['speedup'] == pytest.approx(sum(freedom['sequential_epoch_seconds'])
                                               / freedom['vmapped_epoch_seconds'])
    assert 'no two points' in by_model['mllmrec']['skipped']  # its Baby grid has one point


def test_reference_skipped_with_the_reason_on_a_cpu_torch(tiny_run):
    pytest.importorskip('torch')  # the reason names CUDA only where torch is installed
    out, record = tiny_run
    assert record['references']['checkouts'] == {}
    assert 'torch.cuda.is_available() is False' in record['references']['skipped']
    assert 'References: skipped: torch' in (out / accelerator.MARKDOWN_FILE).read_text()


def test_a_failing_cell_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, tiny_run):
    _, record = tiny_run
    canned = record['cells'][0]['result']
    calls = []

    def fake_benchmark(args, reuse=None):
        calls.append((args.config, args.matmul_dtype))
        if (args.config, args.matmul_dtype) == ('freedom', 'bfloat16'):
            raise JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate '
                                  '17179869184 bytes.\nBufferAssignment OOM Debugging.')
        return dict(canned, model=args.config)

    monkeypatch.setattr(bench, 'run_benchmark', fake_benchmark)
    monkeypatch.setattr(bench, 'gemm_rate', lambda *a, **k: 1e11)
    accelerator.main(['--out', str(tmp_path), '--models', ','.join(MODELS), '--scales', 'tiny',
                      '--sweep_scale', 'none'])
    assert len(calls) == 4
    saved = json.loads((tmp_path / accelerator.JSON_FILE).read_text())
    status = [(c['model'], c['dtype'], c['status']) for c in saved['cells']]
    assert status == [('freedom', 'float32', 'ok'), ('freedom', 'bfloat16', 'failed'),
                      ('mllmrec', 'float32', 'ok'), ('mllmrec', 'bfloat16', 'ok')]
    reason = saved['cells'][1]['reason']
    assert reason.startswith('device out of memory: RESOURCE_EXHAUSTED') and '\n' not in reason
    rows = table((tmp_path / accelerator.MARKDOWN_FILE).read_text())
    assert rows[1][3] == '—' and rows[1][-1] == reason
    assert float(rows[2][3]) == pytest.approx(canned['epoch_min_seconds'], abs=5e-4)


def test_a_killed_run_keeps_the_finished_cells(tmp_path, tiny_run):
    _, record = tiny_run
    # As written after the first two of four cells (the writer runs after each cell).
    partial = dict(record, cells=record['cells'][:2], sweeps=[], finished=False)
    accelerator.write_outputs(tmp_path, partial)
    saved = json.loads((tmp_path / accelerator.JSON_FILE).read_text())
    assert not saved['finished'] and len(saved['cells']) == 2
    text = (tmp_path / accelerator.MARKDOWN_FILE).read_text()
    assert '2 of 4 cells done' in text and len(table(text)) == 2
    assert not list(tmp_path.glob('*.tmp'))


def test_user_mistakes_are_one_error_line(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    for argv, words in ((['--out', str(blocker / 'sub')], '--out'),
                        (['--out', str(tmp_path), '--models', 'lirdrec,nope'], "'nope'"),
                        (['--out', str(tmp_path), '--scales', 'huge'], "'huge'"),
                        (['--out', str(tmp_path), '--dtypes', 'float16'], "'float16'")):
        with pytest.raises(SystemExit) as err:
            accelerator.main(argv)
        message = str(err.value)
        assert message.startswith('error: ') and words in message and '\n' not in message


def test_estimate_adds_up_the_flop_counts_at_the_given_rate():
    args = accelerator.parse_args(['--out', 'x', '--models', 'lirdrec', '--scales', 'elec',
                                   '--dtypes', 'float32', '--sweep_scale', 'none'])
    est = accelerator.estimate_seconds(args, gemm_flops=1e12)
    from lirdrec_jax import cli, grid, models
    from lirdrec_jax.models import base
    cfg = grid.expand_grid(cli.load_config('lirdrec'))[0].config
    users, items, inter = bench.SCALES['elec']
    size = base.ProblemSize(users, items, int(0.74 * inter), 2048, (4096, 384))
    train = 2 * 20 * models.get_model('lirdrec').flops_per_batch(cfg.model, size)  # 2 epochs x 20
    evaluation = 2 * 2 * users * items * 2 * 64
    assert est['cells']['lirdrec elec float32'] == pytest.approx(
        accelerator.COMPILE_SECONDS + (train + evaluation) / (1e12 * accelerator.MATMUL_EFFICIENCY))
    assert est['total_seconds'] == pytest.approx(sum(est['parts'].values()))
