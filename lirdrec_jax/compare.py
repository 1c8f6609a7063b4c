"""Compare finished runs as in the table of a paper, with paired significance tests.

  python -m lirdrec_jax.compare RUN_DIR [RUN_DIR ...] [--labels a,b,...]
      [--metrics recall@20,ndcg@20] [--format {text,markdown,csv,latex}] [--alpha 0.05]
      [--out PREFIX]

A RUN_DIR is what `python -m lirdrec_jax.main` prints as `run directory: ...`. Each run becomes
one row: its grid points are grouped by their hyper-parameter values without `train.seed`; the
group with the highest mean over its seeds of the valid metric (results.json `valid_metric`) is
the run's entry, reported by its test metrics at the best valid epoch (mean ± sample std over
seeds when there are several). Every pair of rows is tested, metric by metric, over the same
test users (RUN/point-NNN/test_users.npz): paired t-test and Wilcoxon signed-rank test.

Marks: `*` (text), bold (Markdown, LaTeX): the best value of its column (higher is better);
`†` / `$^{\\dagger}$`: that best value is also better than every other row with both p-values
below --alpha. --out PREFIX also writes PREFIX.md, PREFIX.csv, PREFIX.tex, PREFIX_pvalues.csv.

Runs are compared only when they share the data (dataset, sizes and the split's hash) and the
Recall@k denominator; otherwise the command names the field that differs.
"""
import argparse
import csv
import io
import itertools
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from scipy import stats

SEED_KEY = 'train.seed'
# results.json 'data' fields two runs must share to be compared on the same test users.
DATA_FIELDS = ('dataset', 'n_users', 'n_items', 'n_train', 'n_valid', 'n_test', 'split_sha256')
DEFAULT_RECALL_DENOMINATOR = 'test_items'  # configs written before eval.recall_denominator
FORMATS = ('text', 'markdown', 'csv', 'latex')
METRIC_ORDER = ('recall', 'ndcg', 'precision', 'map')
DISPLAY_NAMES = {'recall': 'Recall', 'ndcg': 'NDCG', 'precision': 'Precision', 'map': 'MAP'}
RUN_DIR_HINT = ('a run directory is what `python -m lirdrec_jax.main` prints as '
                '`run directory: ...`')


class Entry(NamedTuple):
    """One row of a comparison: the best group of grid points of one run (one point per seed).

    Attributes:
      label: the row's name (by default the model name).
      run_dir: the run directory, as given.
      model: results.json 'model'.
      data: results.json 'data': dataset, n_users, n_items, n_train, n_valid, n_test,
        split_sha256.
      recall_denominator: config.json eval.recall_denominator ('test_items' when absent).
      valid_metric: the metric the group was chosen by, e.g. 'recall@20'.
      valid_score: the group's mean over seeds of best_valid[valid_metric].
      values: the group's hyper-parameter values without `train.seed`.
      points: the indices of the group's points; seeds: their `train.seed` values (None when
        the grid does not sweep it).
      n_groups: how many groups of finished points the run offered.
      mean: {metric: mean over seeds of best_test[metric]}.
      std: {metric: sample std (ddof=1) over seeds of best_test[metric]}; nan with one seed.
      users: (n_test_users,) int64, the test users' ids, ascending.
      per_user: {metric: (n_test_users,) float64}, each user's value at the best valid epoch,
        averaged over the seeds.
      n_seeds: how many points (seeds) the group holds.
    """
    label: str
    run_dir: str
    model: str
    data: dict
    recall_denominator: str
    valid_metric: str
    valid_score: float
    values: dict
    points: tuple
    seeds: tuple
    n_groups: int
    mean: dict
    std: dict
    users: np.ndarray
    per_user: dict
    n_seeds: int


class PairTest(NamedTuple):
    """The paired tests of rows `a` and `b` (indices into Comparison.entries) on one metric.

    mean_diff is the mean over test users of a's value minus b's; both p-values are two-sided
    (1.0 when every difference is zero)."""
    metric: str
    a: int
    b: int
    mean_diff: float
    t_test_p: float
    wilcoxon_p: float


class Comparison(NamedTuple):
    """Rows, columns and tests of a comparison (`compare_entries`).

    Attributes:
      entries: the rows, with unique labels.
      metrics: the columns, e.g. ('recall@10', 'recall@20', 'ndcg@10', 'ndcg@20').
      alpha: the significance level of the dagger mark.
      best: {metric: indices of the rows with the highest mean}.
      significant: {metric: indices of best rows better than every other row with both
        p-values < alpha}.
      pairs: one PairTest per metric and pair of rows (a < b), metric by metric.
    """
    entries: tuple
    metrics: tuple
    alpha: float
    best: dict
    significant: dict
    pairs: tuple


# ----------------------------------------------------------------------------------------------
# Reading a run directory
# ----------------------------------------------------------------------------------------------

def read_run(run_dir) -> Tuple[dict, dict]:
    """results.json and config.json of a run directory; errors say what a run directory is."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f'{run_dir} is not a run directory: no such directory '
                                f'({RUN_DIR_HINT})')
    results_path, config_path = run_dir / 'results.json', run_dir / 'config.json'
    if not results_path.is_file():
        raise FileNotFoundError(
            f'{run_dir} is not a run directory: it has no results.json ({RUN_DIR_HINT}; a run '
            'writes results.json when it ends, an interrupted one when resumed to the end)')
    if not config_path.is_file():
        raise FileNotFoundError(f'{run_dir} has results.json but no config.json: '
                                f'expected {config_path} ({RUN_DIR_HINT})')
    return _read_json(results_path), _read_json(config_path)


def _read_json(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f'{path} is not valid JSON ({err})') from None
    if not isinstance(payload, dict):
        raise ValueError(f'{path} holds a {type(payload).__name__}, expected a JSON object')
    return payload


def read_test_users(path: Path) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """The test users of one point and each one's metric values: (users, {metric: values})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f'{path} is missing: the per-user test values of this point, which every finished '
            'point of a run writes (a run written by an older version of lirdrec_jax has '
            'none; train it again to compare it)')
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: np.asarray(z[k]) for k in z.files}
    if 'users' not in arrays:
        raise ValueError(f'{path} has no array "users"; its arrays: {sorted(arrays)}')
    users = arrays.pop('users').astype(np.int64)
    arrays.pop('epoch', None)
    for key, values in arrays.items():
        if values.shape != users.shape:
            raise ValueError(f'{path}: array {key!r} has shape {values.shape}, expected '
                             f'{users.shape} (one value per test user)')
    return users, {k: v.astype(np.float64) for k, v in arrays.items()}


def load_entry(run_dir, label: Optional[str] = None) -> Entry:
    """The row of one run: its best group of points, their test metrics and per-user values.

    Raises:
      FileNotFoundError: not a run directory, or a point of the chosen group without its
        test_users.npz (the path is named).
      ValueError: results.json without a 'data' block, or without a finished point.
    """
    results, config = read_run(run_dir)
    path = Path(run_dir) / 'results.json'
    if 'data' not in results:
        raise ValueError(f'{path} has no "data" block: the run was written by an older version '
                         'of lirdrec_jax, which did not record its data split; train it again '
                         'to compare it')
    groups = group_points(results.get('points', []), _valid_metric(results, path))
    if not groups:
        raise ValueError(f'{path}: no point finished with a validation result (diverged or '
                         'interrupted points are left out); nothing to compare')
    group = best_group(groups, results['valid_metric'])
    files = [read_test_users(Path(run_dir) / f'point-{p["index"]:03d}' / 'test_users.npz')
             for p in group]
    denominator = config.get('eval', {}).get('recall_denominator', DEFAULT_RECALL_DENOMINATOR)
    return build_entry(results, group, files, run_dir=str(run_dir),
                       label=label or results.get('model', '?'),
                       recall_denominator=denominator, n_groups=len(groups))


def _valid_metric(results: dict, path: Path) -> str:
    if 'valid_metric' not in results:
        raise ValueError(f'{path} has no "valid_metric"')
    return results['valid_metric']


# ----------------------------------------------------------------------------------------------
# Choosing a run's entry (pure)
# ----------------------------------------------------------------------------------------------

def _group_key(values: dict) -> str:
    return json.dumps({k: v for k, v in values.items() if k != SEED_KEY}, sort_keys=True)


def group_points(points: Sequence[dict], valid_metric: str) -> List[List[dict]]:
    """The finished, non-diverged points with a result, grouped by their values without
    `train.seed`; groups in the order of their first point."""
    groups: Dict[str, List[dict]] = {}
    for point in points:
        if not point.get('finished') or point.get('diverged') or not point.get('best_valid') \
                or not point.get('best_test'):
            continue
        if valid_metric not in point['best_valid']:
            raise ValueError(f'point {point["index"]}: best_valid has no {valid_metric!r} (the '
                             f'valid metric); it has {sorted(point["best_valid"])}')
        groups.setdefault(_group_key(point.get('values', {})), []).append(point)
    return list(groups.values())


def best_group(groups: Sequence[List[dict]], valid_metric: str) -> List[dict]:
    """The group with the highest mean over its seeds of best_valid[valid_metric]; the first
    such group on a tie."""
    return max(groups, key=lambda g: np.mean([p['best_valid'][valid_metric] for p in g]))


def seed_statistics(values: Sequence[float]) -> Tuple[float, float]:
    """(mean, sample std with ddof=1) over seeds; the std is nan for one seed."""
    values = np.asarray(values, dtype=np.float64)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return float(np.mean(values)), std


def build_entry(results: dict, group: List[dict], files: Sequence[tuple], *, run_dir: str,
                label: str, recall_denominator: str, n_groups: int) -> Entry:
    """An Entry from results.json, the chosen group and its points' (users, per-user values)."""
    users = files[0][0]
    for point, (other, _) in zip(group[1:], files[1:]):
        if not np.array_equal(users, other):
            raise ValueError(f'{run_dir}: point {point["index"]} has other test users than point '
                             f'{group[0]["index"]} of the same group; their test_users.npz '
                             'files should list the same users')
    tested = set.intersection(*(set(p['best_test']) for p in group))
    per_user_keys = set.intersection(*(set(values) for _, values in files))
    mean, std = {}, {}
    for metric in tested:
        mean[metric], std[metric] = seed_statistics([p['best_test'][metric] for p in group])
    per_user = {m: np.mean([values[m] for _, values in files], axis=0) for m in per_user_keys}
    values = {k: v for k, v in group[0].get('values', {}).items() if k != SEED_KEY}
    valid_metric = results['valid_metric']
    return Entry(label=label, run_dir=run_dir, model=results.get('model', '?'),
                 data=dict(results['data']), recall_denominator=recall_denominator,
                 valid_metric=valid_metric,
                 valid_score=float(np.mean([p['best_valid'][valid_metric] for p in group])),
                 values=values, points=tuple(p['index'] for p in group),
                 seeds=tuple(p.get('values', {}).get(SEED_KEY) for p in group),
                 n_groups=n_groups, mean=mean, std=std, users=users, per_user=per_user,
                 n_seeds=len(group))


# ----------------------------------------------------------------------------------------------
# Comparing entries (pure)
# ----------------------------------------------------------------------------------------------

def unique_labels(labels: Sequence[str]) -> List[str]:
    """Labels made unique by numbering repeats: ['lirdrec', 'lirdrec'] -> [.., 'lirdrec (2)']."""
    out, seen = [], set()
    for label in labels:
        candidate, n = label, 1
        while candidate in seen:
            n += 1
            candidate = f'{label} ({n})'
        seen.add(candidate)
        out.append(candidate)
    return out


def check_comparable(entries: Sequence[Entry]) -> None:
    """ValueError naming the field, both values and both run directories unless every entry
    shares the first one's data, Recall@k denominator and test users."""
    first = entries[0]
    for other in entries[1:]:
        where = f'cannot compare {first.run_dir} and {other.run_dir}'
        for field in DATA_FIELDS:
            a, b = first.data.get(field), other.data.get(field)
            if a != b:
                raise ValueError(f'{where}: results.json data.{field} differs ({a!r} vs {b!r}); '
                                 'runs must share the dataset and its train/valid/test split')
        if first.recall_denominator != other.recall_denominator:
            raise ValueError(
                f'{where}: config eval.recall_denominator differs '
                f'({first.recall_denominator!r} vs {other.recall_denominator!r}), so Recall@k '
                'means different things; train one again with '
                f'--config.eval.recall_denominator={first.recall_denominator}')
        if not np.array_equal(first.users, other.users):
            raise ValueError(f'{where}: their test_users.npz files list different test users '
                             f'({len(first.users)} vs {len(other.users)} users), although the '
                             'split hashes agree')


def _metric_sort_key(metric: str):
    name, _, k = metric.partition('@')
    rank = METRIC_ORDER.index(name) if name in METRIC_ORDER else len(METRIC_ORDER)
    return rank, name, int(k) if k.isdigit() else 0, k


def available_metrics(entries: Sequence[Entry]) -> List[str]:
    """The metrics every entry has both as a test result and per user, in table order."""
    common = set.intersection(*(set(e.mean) & set(e.per_user) for e in entries))
    return sorted(common, key=_metric_sort_key)


def resolve_metrics(entries: Sequence[Entry], metrics: Optional[Sequence[str]]) -> List[str]:
    """The requested metrics (lower-cased), or recall@k and ndcg@k for every k all runs have;
    ValueError naming what is available otherwise."""
    available = available_metrics(entries)
    if metrics is None:
        chosen = [m for m in available if m.partition('@')[0] in ('recall', 'ndcg')]
        if not chosen:
            raise ValueError(f'the runs share no recall@k or ndcg@k; choose with --metrics from: '
                             f'{", ".join(available) or "none"}')
        return chosen
    chosen = [m.strip().lower() for m in metrics if m.strip()]
    unknown = [m for m in chosen if m not in available]
    if unknown or not chosen:
        raise ValueError(f'unknown metric {", ".join(unknown) or "(none given)"}: the runs all '
                         f'have {", ".join(available) or "none"}')
    return chosen


def paired_tests(a: np.ndarray, b: np.ndarray) -> Tuple[float, float, float]:
    """(mean of a - b, paired t-test p, Wilcoxon signed-rank p), both two-sided, over users.

    When every difference is zero both p-values are 1.0 (the tests are undefined there)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = a - b
    if not np.any(diff):
        return 0.0, 1.0, 1.0
    with warnings.catch_warnings():  # nearly constant differences, tiny samples: p is still
        warnings.simplefilter('ignore', RuntimeWarning)  # what scipy returns (nan, or ~0)
        t_p = float(stats.ttest_rel(a, b).pvalue)
        w_p = float(stats.wilcoxon(a, b).pvalue)
    return float(np.mean(diff)), t_p, w_p


def _difference(pairs: Sequence[PairTest], metric: str, row: int, other: int) -> PairTest:
    """The test of `row` against `other`, oriented so that mean_diff is row - other."""
    for p in pairs:
        if p.metric == metric and (p.a, p.b) == (row, other):
            return p
        if p.metric == metric and (p.a, p.b) == (other, row):
            return p._replace(a=row, b=other, mean_diff=-p.mean_diff)
    raise KeyError((metric, row, other))


def is_significantly_best(pairs, metric: str, row: int, n_rows: int, alpha: float) -> bool:
    """Whether `row` beats every other row on `metric` with both p-values < alpha."""
    others = [o for o in range(n_rows) if o != row]
    tests = [_difference(pairs, metric, row, o) for o in others]
    return bool(others) and all(t.mean_diff > 0 and t.t_test_p < alpha and t.wilcoxon_p < alpha
                                for t in tests)


def compare_entries(entries: Sequence[Entry], metrics: Optional[Sequence[str]] = None,
                    alpha: float = 0.05) -> Comparison:
    """Checks that the entries can be compared, tests every pair on every metric and marks
    the best row of each column (and whether it is significantly better than all others)."""
    if not entries:
        raise ValueError('no runs to compare')
    if not 0 < alpha < 1:
        raise ValueError(f'alpha = {alpha}; expected a significance level between 0 and 1')
    entries = tuple(e._replace(label=l)
                    for e, l in zip(entries, unique_labels([e.label for e in entries])))
    check_comparable(entries)
    metrics = tuple(resolve_metrics(entries, metrics))
    pairs = tuple(PairTest(m, i, j, *paired_tests(entries[i].per_user[m], entries[j].per_user[m]))
                  for m in metrics for i, j in itertools.combinations(range(len(entries)), 2))
    best, significant = {}, {}
    for m in metrics:
        top = max(e.mean[m] for e in entries)
        best[m] = tuple(i for i, e in enumerate(entries) if e.mean[m] == top)
        significant[m] = tuple(i for i in best[m]
                               if is_significantly_best(pairs, m, i, len(entries), alpha))
    return Comparison(entries, metrics, alpha, best, significant, pairs)


# ----------------------------------------------------------------------------------------------
# Formatting (pure)
# ----------------------------------------------------------------------------------------------

def display_name(metric: str) -> str:
    """'recall@20' -> 'Recall@20'."""
    name, sep, k = metric.partition('@')
    return DISPLAY_NAMES.get(name, name) + sep + k


def _value(entry: Entry, metric: str, pm: str = ' ± ') -> str:
    text = f'{entry.mean[metric]:.4f}'
    return text + (f'{pm}{entry.std[metric]:.4f}' if entry.n_seeds > 1 else '')


def _p_text(p: float) -> str:
    if math.isnan(p):
        return 'nan'
    return f'{p:.4f}' if p >= 1e-4 else f'{p:.1e}'


def _fixed_width(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(c) for c in column) for column in zip(header, *rows)]
    line = lambda cells: '  '.join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return '\n'.join([line(header), '-' * (sum(widths) + 2 * (len(widths) - 1))]
                     + [line(r) for r in rows])


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    escape = lambda c: c.replace('|', r'\|')
    lines = ['| ' + ' | '.join(map(escape, header)) + ' |',
             '|' + '|'.join(':--' if a == 'l' else '--:' for a in align) + '|']
    return '\n'.join(lines + ['| ' + ' | '.join(map(escape, r)) + ' |' for r in rows])


def _csv(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().rstrip('\n')


def latex_escape(text: str) -> str:
    """Text safe inside a LaTeX table cell."""
    special = {'\\': r'\textbackslash{}', '&': r'\&', '%': r'\%', '$': r'\$', '#': r'\#',
               '_': r'\_', '{': r'\{', '}': r'\}', '~': r'\textasciitilde{}',
               '^': r'\textasciicircum{}'}
    return ''.join(special.get(c, c) for c in text)


def _latex(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    lines = [f'\\begin{{tabular}}{{{align}}}', r'\toprule', ' & '.join(header) + r' \\',
             r'\midrule']
    lines += [' & '.join(r) + r' \\' for r in rows]
    return '\n'.join(lines + [r'\bottomrule', r'\end{tabular}'])


def _marked(comparison: Comparison, row: int, metric: str, fmt: str) -> str:
    """One cell of the main table with its marks in format `fmt`."""
    entry = comparison.entries[row]
    is_best = row in comparison.best[metric]
    dagger = row in comparison.significant[metric]
    if fmt == 'latex':
        text = _value(entry, metric, pm=r' $\pm$ ')
        return (rf'\textbf{{{text}}}' if is_best else text) + (r'$^{\dagger}$' if dagger else '')
    text = _value(entry, metric)
    if fmt == 'markdown':
        return (f'**{text}**' if is_best else text) + ('†' if dagger else '')
    return text + ('*' if is_best else '') + ('†' if dagger else '')


def _has_seeds(comparison: Comparison) -> bool:
    return any(e.n_seeds > 1 for e in comparison.entries)


def format_table(comparison: Comparison, fmt: str = 'text') -> str:
    """The main table (rows = runs, columns = metrics) in `fmt` (one of FORMATS)."""
    entries, metrics = comparison.entries, comparison.metrics
    if fmt == 'csv':
        with_std = _has_seeds(comparison)
        header = ['label', 'n_seeds']
        for m in metrics:
            header += [m, f'{m}_std'] if with_std else [m]
        rows = []
        for e in entries:
            row = [e.label, e.n_seeds]
            for m in metrics:
                row += [repr(e.mean[m])]
                if with_std:
                    row += [repr(e.std[m]) if e.n_seeds > 1 else '']
            rows.append(row)
        return _csv(header, rows)
    names = [display_name(m) for m in metrics]
    cells = [[_marked(comparison, i, m, fmt) for m in metrics] for i in range(len(entries))]
    if fmt == 'latex':
        rows = [[latex_escape(e.label)] + c for e, c in zip(entries, cells)]
        return f'{legend(comparison, "latex")}\n' + _latex(['Model'] + names, rows,
                                                            'l' + 'c' * len(metrics))
    rows = [[e.label, str(e.n_seeds)] + c for e, c in zip(entries, cells)]
    if fmt == 'markdown':
        return _markdown(['run', 'seeds'] + names, rows, 'lr' + 'r' * len(metrics))
    if fmt == 'text':
        return _fixed_width(['run', 'seeds'] + names, rows)
    raise ValueError(f'unknown format {fmt!r}; expected one of {", ".join(FORMATS)}')


def pairwise_table(comparison: Comparison, fmt: str = 'text') -> str:
    """The paired tests of every pair of rows, metric by metric, in `fmt` (one of FORMATS)."""
    labels = [e.label for e in comparison.entries]
    if fmt == 'csv':
        return _csv(['metric', 'a', 'b', 'mean_diff', 't_test_p', 'wilcoxon_p'],
                    [[p.metric, labels[p.a], labels[p.b], repr(p.mean_diff), repr(p.t_test_p),
                      repr(p.wilcoxon_p)] for p in comparison.pairs])
    if fmt not in FORMATS:
        raise ValueError(f'unknown format {fmt!r}; expected one of {", ".join(FORMATS)}')
    if not comparison.pairs:
        return '(one run: no pairs to test)' if fmt != 'latex' else '% one run: no pairs to test'
    header = ['metric', 'A', 'B', 'mean A - B', 't-test p', 'Wilcoxon p']
    rows = [[display_name(p.metric), labels[p.a], labels[p.b], f'{p.mean_diff:+.4f}',
             _p_text(p.t_test_p), _p_text(p.wilcoxon_p)] for p in comparison.pairs]
    n_users = len(comparison.entries[0].users)
    title = (f'Paired tests over the same {n_users} test users (two-sided; mean A - B of the '
             'per-user values):')
    if fmt == 'latex':
        rows = [[latex_escape(c) for c in r] for r in rows]
        return f'% {title}\n' + _latex([latex_escape(h) for h in header], rows, 'lllrrr')
    if fmt == 'markdown':
        return f'{title}\n\n' + _markdown(header, rows, 'lllrrr')
    return f'{title}\n' + _fixed_width(header, rows)


def legend(comparison: Comparison, fmt: str = 'text') -> str:
    """One line on what the marks mean, in `fmt` (LaTeX: a comment line, CSV: '# ...')."""
    n_users, alpha = len(comparison.entries[0].users), comparison.alpha
    tests = (f'paired t-test and Wilcoxon signed-rank test both p < {alpha:g} over the same '
             f'{n_users} test users')
    seeds = '; mean ± sample std (ddof=1) over seeds' if _has_seeds(comparison) else ''
    if fmt == 'latex':
        return (f'% Bold: best in its column (higher is better); $^{{\\dagger}}$: better than '
                f'every other row ({tests})' + seeds.replace('±', r'$\pm$') + '.')
    if fmt == 'markdown':
        return (f'**Bold**: best in its column (higher is better); †: better than every other '
                f'row ({tests}){seeds}.')
    line = (f'* best in its column (higher is better); † better than every other row '
            f'({tests}){seeds}.')
    return f'# {line}' if fmt == 'csv' else line


def describe(comparison: Comparison) -> str:
    """The data and, per row, the run directory and the chosen hyper-parameters and seeds."""
    first = comparison.entries[0]
    d = first.data
    lines = [f'dataset {d.get("dataset")}: {d.get("n_users")} users, {d.get("n_items")} items, '
             f'{len(first.users)} test users (split {str(d.get("split_sha256"))[:12]}), '
             f'Recall@k / {first.recall_denominator}']
    for e in comparison.entries:
        values = ', '.join(f'{k}={v}' for k, v in e.values.items()) or 'no swept values'
        seeds = ', '.join(str(s) for s in e.seeds if s is not None)
        settings = f'{e.n_groups} setting' + ('s' if e.n_groups > 1 else '')
        lines.append(f'{e.label}: {e.run_dir}\n    best of {settings} by valid '
                     f'{e.valid_metric} {e.valid_score:.4f}: {values}; {e.n_seeds} seed'
                     f'{"s" if e.n_seeds > 1 else ""}' + (f' ({seeds})' if seeds else ''))
    return '\n'.join(lines)


def render(comparison: Comparison, fmt: str = 'text') -> str:
    """What the command prints: table, pairwise tests and the legend (text: the runs first)."""
    table, pairs = format_table(comparison, fmt), pairwise_table(comparison, fmt)
    if fmt == 'latex':  # the legend is the table's comment line
        return f'{table}\n\n{pairs}'
    parts = [describe(comparison)] if fmt == 'text' else []
    parts += [table, legend(comparison, fmt), pairs] if fmt == 'markdown' else \
        [table, pairs, legend(comparison, fmt)]
    return '\n\n'.join(parts)


# ----------------------------------------------------------------------------------------------
# Files and command line
# ----------------------------------------------------------------------------------------------

def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` via a temp file in the same folder and os.replace: never half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(text, encoding='utf-8')
    os.replace(tmp, path)


def write_outputs(comparison: Comparison, prefix) -> List[Path]:
    """PREFIX.md, PREFIX.csv, PREFIX.tex and PREFIX_pvalues.csv; returns their paths."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    contents = {'.md': render(comparison, 'markdown'), '.csv': format_table(comparison, 'csv'),
                '.tex': format_table(comparison, 'latex'),
                '_pvalues.csv': pairwise_table(comparison, 'csv')}
    paths = []
    for suffix, text in contents.items():
        path = prefix.with_name(prefix.name + suffix)
        write_text_atomic(path, text + '\n')
        paths.append(path)
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m lirdrec_jax.compare', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('run_dirs', nargs='+', metavar='RUN_DIR', help='a run directory')
    p.add_argument('--labels', help='comma-separated row labels, one per RUN_DIR (default: '
                                    'the model names, numbered when repeated)')
    p.add_argument('--metrics', help='comma-separated columns, e.g. recall@20,ndcg@20 '
                                     '(default: recall@k and ndcg@k for every k of all runs)')
    p.add_argument('--format', choices=FORMATS, default='text', help="stdout's table format")
    p.add_argument('--alpha', type=float, default=0.05,
                   help='significance level of the dagger mark (both tests)')
    p.add_argument('--out', metavar='PREFIX',
                   help='also write PREFIX.md, PREFIX.csv, PREFIX.tex, PREFIX_pvalues.csv')
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Comparison:
    """Load, compare, print and (with --out) write; ValueError/OSError for bad input."""
    labels = [None] * len(args.run_dirs)
    if args.labels is not None:
        labels = [l.strip() for l in args.labels.split(',')]
        if len(labels) != len(args.run_dirs):
            raise ValueError(f'--labels gives {len(labels)} labels for {len(args.run_dirs)} run '
                             'directories; give one label per RUN_DIR')
    entries = [load_entry(d, l) for d, l in zip(args.run_dirs, labels)]
    metrics = args.metrics.split(',') if args.metrics is not None else None
    comparison = compare_entries(entries, metrics, args.alpha)
    print(render(comparison, args.format), flush=True)
    if args.out:
        paths = write_outputs(comparison, args.out)
        print('wrote ' + ', '.join(map(str, paths)), file=sys.stderr)
    return comparison


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as err:
        # Bad input (a path, a file, runs that cannot be compared): the message names it.
        if os.environ.get('LIRDREC_JAX_TRACEBACK'):
            raise
        print(f'error: {err}\n(set LIRDREC_JAX_TRACEBACK=1 to see the traceback)',
              file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
