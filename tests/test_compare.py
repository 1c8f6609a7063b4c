"""Comparing runs (lirdrec_jax.compare): the chosen group, seed statistics, the paired tests
against hand computations, the marks in each format, refusals, and the command."""
import csv
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from lirdrec_jax import compare

REPO = Path(__file__).resolve().parents[1]
USERS = np.arange(3, 603, 3, dtype=np.int64)  # 200 test users, ids ascending, not contiguous
METRICS = ('recall@10', 'recall@20', 'ndcg@10', 'ndcg@20')
DATA = {'dataset': 'baby', 'n_users': 700, 'n_items': 300, 'n_train': 5000, 'n_valid': 700,
        'n_test': 700, 'split_sha256': 'a' * 64}


def point(index, values, valid, per_user=None, finished=True, diverged=None):
    """A results.json point; `per_user` ({metric: values}) also becomes its test_users.npz."""
    scored = per_user is not None and not diverged
    return {'index': index, 'values': values, 'finished': finished, 'diverged': diverged,
            'per_user': per_user, 'best_epoch': 3 if scored else -1,
            'best_valid': {'recall@20': valid} if scored else None,
            'best_test': {m: float(np.mean(v)) for m, v in per_user.items()} if scored else None}


def write_run(root: Path, name: str, points, *, model='lirdrec', data=DATA,
              denominator='test_items', users=USERS) -> Path:
    """A run directory as `python -m lirdrec_jax.main` writes it (the files compare reads)."""
    run = root / name
    run.mkdir(parents=True)
    saved = []
    for p in points:
        p = dict(p)
        per_user = p.pop('per_user')
        if not p['diverged']:
            p.pop('diverged')
        saved.append(p)
        point_dir = run / f'point-{p["index"]:03d}'
        point_dir.mkdir()
        if p['finished'] and p.get('best_test'):
            np.savez(point_dir / 'test_users.npz', users=users, epoch=np.int64(3),
                     **{m: np.asarray(v, np.float64) for m, v in per_user.items()})
    results = {'dataset': data['dataset'] if data else 'baby', 'model': model,
               'hyper_parameters': ['optim.learning_rate', 'train.seed'],
               'valid_metric': 'recall@20', 'points': saved, 'best_point': 0,
               'popularity': {}, 'finished': True}
    if data is not None:
        results['data'] = data
    (run / 'results.json').write_text(json.dumps(results))
    config = {'model_name': model, 'eval': {'metrics': ['recall', 'ndcg'], 'topk': [10, 20]}}
    if denominator is not None:
        config['eval']['recall_denominator'] = denominator
    (run / 'config.json').write_text(json.dumps(config))
    return run


def random_metrics(seed, shift=0.0, n=len(USERS)):
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.2, 0.6, size=n)
    return {m: base + shift + rng.normal(0, 0.05, size=n) for m in METRICS}


def single_run(root, name, per_user, **kwargs):
    return write_run(root, name, [point(0, {'train.seed': 999}, 0.3, per_user)], **kwargs)


# ----------------------------------------------------------------------------------------------
# The chosen group and its statistics
# ----------------------------------------------------------------------------------------------

def test_the_group_with_the_best_mean_valid_score_over_finished_seeds_is_the_entry(tmp_path):
    m = [random_metrics(s) for s in range(5)]
    lr_a, lr_b = {'optim.learning_rate': 0.01}, {'optim.learning_rate': 0.001}
    points = [point(0, {**lr_a, 'train.seed': 1}, 0.30, m[0]),  # highest single valid score
              point(1, {**lr_a, 'train.seed': 2}, 0.10, m[1]),
              point(2, {**lr_a, 'train.seed': 3}, 0.10, m[2]),
              # interrupted: would lift group a's mean to 0.35 if it counted
              point(3, {**lr_a, 'train.seed': 4}, 0.90, m[3], finished=False),
              point(4, {**lr_b, 'train.seed': 1}, 0.20, m[3]),
              point(5, {**lr_b, 'train.seed': 2}, 0.21, m[4]),
              point(6, {**lr_b, 'train.seed': 3}, None, None, diverged='loss is nan at step 4')]
    entry = compare.load_entry(write_run(tmp_path, 'run', points))
    assert entry.label == 'lirdrec' and entry.values == lr_b
    assert entry.points == (4, 5) and entry.seeds == (1, 2) and entry.n_seeds == 2
    assert entry.n_groups == 2 and entry.valid_score == pytest.approx(0.205)
    for metric in METRICS:
        seeds = [np.mean(m[3][metric]), np.mean(m[4][metric])]
        assert entry.mean[metric] == pytest.approx(np.mean(seeds), rel=1e-12)
        assert entry.std[metric] == pytest.approx(np.std(seeds, ddof=1), rel=1e-12)
        np.testing.assert_allclose(entry.per_user[metric], (m[3][metric] + m[4][metric]) / 2)
    np.testing.assert_array_equal(entry.users, USERS)


def test_seeds_of_a_group_must_share_their_test_users(tmp_path):
    points = [point(i, {'train.seed': i}, 0.3, random_metrics(i)) for i in range(2)]
    run = write_run(tmp_path, 'run', points)
    np.savez(run / 'point-001' / 'test_users.npz', users=USERS + 1,
             **{m: v for m, v in random_metrics(1).items()})
    with pytest.raises(ValueError, match='point 1 has other test users than point 0'):
        compare.load_entry(run)


def test_one_seed_reports_the_value_without_std(tmp_path):
    m = random_metrics(0)
    entry = compare.load_entry(single_run(tmp_path, 'run', m), label='ours')
    assert entry.label == 'ours' and entry.n_seeds == 1 and math.isnan(entry.std['recall@20'])
    comparison = compare.compare_entries([entry])
    assert '±' not in compare.format_table(comparison, 'text')
    assert f'{np.mean(m["recall@20"]):.4f}*' in compare.format_table(comparison, 'text')


# ----------------------------------------------------------------------------------------------
# The paired tests against hand computations
# ----------------------------------------------------------------------------------------------

def test_paired_t_test_p_value_is_the_hand_computed_t_distribution_tail(tmp_path):
    a, b = random_metrics(1, shift=0.01), random_metrics(2)
    entries = [compare.load_entry(single_run(tmp_path, n, m)) for n, m in (('a', a), ('b', b))]
    comparison = compare.compare_entries(entries, ['recall@20', 'ndcg@10'])
    for test in comparison.pairs:
        d = a[test.metric] - b[test.metric]
        n = len(d)
        t = d.mean() / (d.std(ddof=1) / math.sqrt(n))
        assert test.mean_diff == pytest.approx(d.mean(), rel=1e-12)
        assert test.t_test_p == pytest.approx(2 * stats.t.sf(abs(t), n - 1), rel=1e-9)
        assert 1e-6 < test.t_test_p < 0.9  # a case where the tail is neither 0 nor 1


def exact_wilcoxon_p(d):
    """Two-sided exact p of the signed-rank statistic by enumerating every sign assignment
    (no zeros and no ties in |d|)."""
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    observed = ranks[d > 0].sum()
    centre = len(d) * (len(d) + 1) / 4
    sums = [ranks[np.array(signs, bool)].sum()
            for signs in itertools.product((0, 1), repeat=len(d))]
    return np.mean([abs(s - centre) >= abs(observed - centre) - 1e-9 for s in sums])


@pytest.mark.parametrize('signs', ['++++++-+', '+-+-+-++', '++++++++', '-+--+---'])
def test_wilcoxon_p_value_is_the_exact_enumeration_over_eight_users(signs):
    rng = np.random.default_rng(3)
    magnitudes = rng.permutation(np.arange(1, 9)) * 0.01 + rng.uniform(0, 0.001, size=8)
    d = np.array([1 if s == '+' else -1 for s in signs]) * magnitudes
    b = rng.uniform(0.2, 0.6, size=8)
    mean_diff, _, wilcoxon_p = compare.paired_tests(b + d, b)
    assert mean_diff == pytest.approx(d.mean(), abs=1e-12)
    assert wilcoxon_p == pytest.approx(exact_wilcoxon_p(d), rel=1e-9)


def test_identical_values_give_p_values_of_one():
    values = np.random.default_rng(0).uniform(size=30)
    assert compare.paired_tests(values, values.copy()) == (0.0, 1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Marks in every format
# ----------------------------------------------------------------------------------------------

def marked_runs(tmp_path, swap_recall20=False):
    """Three runs; by construction (checked in the test):
    recall@20: a clearly best (dagger); recall@10: a best, significantly better than c but not
    than b (no dagger); ndcg@20: b best by a hair over a (no dagger); ndcg@10: c clearly best."""
    rng = np.random.default_rng(7)
    n = len(USERS)
    base = {m: rng.uniform(0.2, 0.6, size=n) for m in METRICS}
    noise = lambda: rng.normal(0, 0.05, size=n)
    hair = lambda: (lambda e: e - e.mean() + 2e-4)(rng.normal(0, 0.05, size=n))
    a = {'recall@20': base['recall@20'] + 0.05 + noise(), 'recall@10': base['recall@10'],
         'ndcg@20': base['ndcg@20'], 'ndcg@10': base['ndcg@10'] + noise()}
    b = {'recall@20': base['recall@20'] + noise(), 'recall@10': a['recall@10'] - hair(),
         'ndcg@20': a['ndcg@20'] + hair(), 'ndcg@10': base['ndcg@10'] + noise()}
    c = {'recall@20': base['recall@20'] - 0.02 + noise(),
         'recall@10': base['recall@10'] - 0.05 + noise(),
         'ndcg@20': base['ndcg@20'] - 0.05 + noise(),
         'ndcg@10': base['ndcg@10'] + 0.06 + noise()}
    if swap_recall20:
        a['recall@20'], b['recall@20'] = b['recall@20'], a['recall@20']
    runs = [single_run(tmp_path, name, m, model=model)
            for name, m, model in (('a', a, 'lirdrec'), ('b', b, 'freedom'), ('c', c, 'cm3'))]
    return runs, (a, b, c)


def latex_cells(tex):
    body = tex.split('\\midrule\n')[1].split('\n\\bottomrule')[0]
    header = tex.split('\\toprule\n')[1].split(' \\\\')[0].split(' & ')
    rows = [line.rstrip(' \\').split(' & ') for line in body.splitlines()]
    return {(row[0], h): cell for row in rows for h, cell in zip(header[1:], row[1:])}


def markdown_cells(md):
    lines = [l for l in md.splitlines() if l.startswith('|')]
    split = lambda l: [c.strip() for c in l.strip('|').split('|')]
    header = split(lines[0])
    return {(split(l)[0], h): c for l in lines[2:] for h, c in zip(header[2:], split(l)[2:])}


BOLD = {('lirdrec', 'Recall@20'), ('lirdrec', 'Recall@10'), ('freedom', 'NDCG@20'),
        ('cm3', 'NDCG@10')}


def test_bold_and_dagger_land_on_the_right_cells(tmp_path):
    runs, (a, b, c) = marked_runs(tmp_path)
    comparison = compare.compare_entries([compare.load_entry(r) for r in runs])
    assert comparison.metrics == ('recall@10', 'recall@20', 'ndcg@10', 'ndcg@20')
    # The construction holds: the unmarked best cells are not significant against a neighbour.
    assert compare.paired_tests(a['recall@10'], b['recall@10'])[1] > 0.5
    assert compare.paired_tests(b['ndcg@20'], a['ndcg@20'])[2] > 0.5
    assert compare.paired_tests(a['recall@10'], c['recall@10'])[1] < 1e-6

    latex = latex_cells(compare.format_table(comparison, 'latex'))
    assert {k for k, cell in latex.items() if cell.startswith('\\textbf{')} == BOLD
    daggers = {k for k, cell in latex.items() if cell.endswith('$^{\\dagger}$')}
    assert daggers == {('lirdrec', 'Recall@20'), ('cm3', 'NDCG@10')}
    assert latex[('lirdrec', 'Recall@20')] == \
        f'\\textbf{{{np.mean(a["recall@20"]):.4f}}}$^{{\\dagger}}$'

    md = markdown_cells(compare.format_table(comparison, 'markdown'))
    assert {k for k, cell in md.items() if cell.startswith('**')} == BOLD
    assert {k for k, cell in md.items() if cell.endswith('†')} == daggers
    text = compare.format_table(comparison, 'text').splitlines()
    starred = {(line.split()[0], h) for line in text[2:]
               for h, cell in zip(text[0].split()[2:], line.split()[2:]) if '*' in cell}
    assert starred == BOLD


def test_swapping_two_runs_per_user_values_moves_the_mark(tmp_path):
    runs, _ = marked_runs(tmp_path, swap_recall20=True)
    comparison = compare.compare_entries([compare.load_entry(r) for r in runs])
    latex = latex_cells(compare.format_table(comparison, 'latex'))
    assert latex[('freedom', 'Recall@20')].endswith('$^{\\dagger}$')
    assert not latex[('lirdrec', 'Recall@20')].startswith('\\textbf')
    assert comparison.significant['recall@20'] == (1,)


def test_no_dagger_when_the_difference_is_not_significant(tmp_path):
    m = random_metrics(4)
    close = {k: v + 1e-4 + np.random.default_rng(5).normal(0, 0.05, size=len(v))
             for k, v in m.items()}
    runs = [single_run(tmp_path, 'a', m), single_run(tmp_path, 'b', close)]
    comparison = compare.compare_entries([compare.load_entry(r) for r in runs])
    assert all(comparison.significant[k] == () for k in comparison.metrics)
    cells = latex_cells(compare.format_table(comparison, 'latex')).values()
    assert sum(c.startswith('\\textbf{') for c in cells) == 4  # one best per column
    assert not any('dagger' in c for c in cells)
    assert all(p.t_test_p > 0.05 or p.wilcoxon_p > 0.05 for p in comparison.pairs)


def test_csv_round_trips_to_the_numbers(tmp_path):
    seeds = [point(i, {'train.seed': i}, 0.3, random_metrics(10 + i)) for i in range(3)]
    runs = [write_run(tmp_path, 'multi', seeds), single_run(tmp_path, 'one', random_metrics(9))]
    comparison = compare.compare_entries([compare.load_entry(r) for r in runs])
    paths = compare.write_outputs(comparison, tmp_path / 'out' / 'table')
    assert [p.name for p in paths] == ['table.md', 'table.csv', 'table.tex', 'table_pvalues.csv']
    rows = list(csv.DictReader((tmp_path / 'out' / 'table.csv').open()))
    assert [r['label'] for r in rows] == ['lirdrec', 'lirdrec (2)']
    for row, entry in zip(rows, comparison.entries):
        assert int(row['n_seeds']) == entry.n_seeds
        for metric in comparison.metrics:
            assert float(row[metric]) == entry.mean[metric]
            assert row[f'{metric}_std'] == ('' if entry.n_seeds == 1 else repr(entry.std[metric]))
    pvalues = list(csv.DictReader((tmp_path / 'out' / 'table_pvalues.csv').open()))
    assert len(pvalues) == len(comparison.pairs) == 4
    for row, test in zip(pvalues, comparison.pairs):
        assert (row['metric'], float(row['mean_diff']), float(row['t_test_p']),
                float(row['wilcoxon_p'])) == (test.metric, test.mean_diff, test.t_test_p,
                                              test.wilcoxon_p)
    entry = comparison.entries[0]
    expected = f'{entry.mean["ndcg@20"]:.4f} ± {entry.std["ndcg@20"]:.4f}'
    assert expected in (tmp_path / 'out' / 'table.md').read_text()
    assert expected.replace('±', '$\\pm$') in (tmp_path / 'out' / 'table.tex').read_text()


# ----------------------------------------------------------------------------------------------
# Refusals and choices
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('change, expected', [
    ({'data': {**DATA, 'dataset': 'sports'}}, ["data.dataset", "'baby'", "'sports'"]),
    ({'data': {**DATA, 'n_test': 699}}, ['data.n_test', '700', '699']),
    ({'data': {**DATA, 'split_sha256': 'b' * 64}}, ['data.split_sha256', 'a' * 64, 'b' * 64]),
    ({'denominator': 'min_k_test_items'},
     ['eval.recall_denominator', "'min_k_test_items'",
      '--config.eval.recall_denominator=test_items']),
    ({'denominator': None, 'other_denominator': 'min_k_test_items'},
     ['eval.recall_denominator', "'test_items'", "'min_k_test_items'"]),
    ({'users': USERS + 1}, ['different test users']),
])
def test_runs_that_differ_are_refused_naming_the_difference(tmp_path, change, expected):
    change = dict(change)
    first = single_run(tmp_path, 'first', random_metrics(0),
                       denominator=change.pop('other_denominator', 'test_items'))
    second = single_run(tmp_path, 'second', random_metrics(1), **change)
    entries = [compare.load_entry(first), compare.load_entry(second)]
    with pytest.raises(ValueError) as err:
        compare.compare_entries(entries)
    for text in expected + [str(first), str(second)]:
        assert text in str(err.value)


def test_a_missing_test_users_file_is_named(tmp_path):
    run = single_run(tmp_path, 'run', random_metrics(0))
    (run / 'point-000' / 'test_users.npz').unlink()
    with pytest.raises(FileNotFoundError, match='point-000/test_users.npz is missing'):
        compare.load_entry(run)


def test_a_run_without_a_data_block_is_from_an_older_version(tmp_path):
    run = single_run(tmp_path, 'run', random_metrics(0), data=None)
    with pytest.raises(ValueError, match='no "data" block.*older version'):
        compare.load_entry(run)


def test_labels_metrics_and_their_errors(tmp_path):
    runs = [single_run(tmp_path, n, random_metrics(i)) for i, n in enumerate('abc')]
    entries = [compare.load_entry(r) for r in runs]
    comparison = compare.compare_entries(entries, ['NDCG@20', 'recall@10'])
    assert [e.label for e in comparison.entries] == ['lirdrec', 'lirdrec (2)', 'lirdrec (3)']
    assert comparison.metrics == ('ndcg@20', 'recall@10')
    with pytest.raises(ValueError, match='unknown metric map@20: the runs all have recall@10, '
                                         'recall@20, ndcg@10, ndcg@20'):
        compare.compare_entries(entries, ['recall@20', 'map@20'])
    args = compare.parse_args([str(r) for r in runs] + ['--labels', 'x,y'])
    with pytest.raises(ValueError, match='--labels gives 2 labels for 3 run directories'):
        compare.run(args)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

def run_command(*args, cwd):
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    env.pop('LIRDREC_JAX_TRACEBACK', None)
    return subprocess.run([sys.executable, '-m', 'lirdrec_jax.compare', *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_command_prints_the_table_from_any_directory_and_one_error_line(tmp_path):
    runs, (a, _, _) = marked_runs(tmp_path)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    out = run_command(*runs, '--labels', 'Ours,FREEDOM,CM3', '--out', 'paper/table',
                      cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith('run  '))
    assert lines[header].split() == ['run', 'seeds', 'Recall@10', 'Recall@20', 'NDCG@10',
                                     'NDCG@20']
    assert lines[header + 2].split()[:4] == ['Ours', '1', f'{np.mean(a["recall@10"]):.4f}*',
                                             f'{np.mean(a["recall@20"]):.4f}*†']
    assert any(l.startswith('Recall@20  Ours') for l in lines)  # the pairwise table
    assert lines[-1].startswith('* best in its column')
    tex = latex_cells((elsewhere / 'paper' / 'table.tex').read_text())
    assert {k for k, cell in tex.items() if cell.endswith('$^{\\dagger}$')} == \
        {('Ours', 'Recall@20'), ('CM3', 'NDCG@10')}

    bad = run_command(tmp_path / 'a' / 'point-000', cwd=elsewhere)
    errors = [l for l in bad.stderr.splitlines() if l.startswith('error:')]
    assert bad.returncode == 1 and len(errors) == 1 and 'Traceback' not in bad.stderr
    assert 'results.json' in errors[0] and '`run directory: ...`' in errors[0]
