"""End-to-end agreement (`python -m lirdrec_jax.parity ... --full [--seeds N]`): both
implementations trained to early stopping, each with its OWN random streams, over N seeds, and
their final metrics compared within seed noise.

The step-by-step checks (the rest of this package) feed both sides identical weights and
batches. This mode does the opposite: the reference runs as its `quick_start` would run it
(its own initialisation, its own data loader and negative sampling, its own `Trainer.fit` with
early stopping), ours as `python -m lirdrec_jax.main` would (`train.train_and_evaluate`), on the
same data splits, scored with the same (MMRec) metric definitions. Two correct implementations
then differ only by seed noise; the verdict asks whether the observed difference is within it.

The verdict (docs/parity.md, "End-to-end agreement"): for each headline comparison (the valid
metric and NDCG at its cutoff, on valid and test: Recall@20 and NDCG@20 by default) the
difference of the means is within seed noise when it is at most

    allowed = max(t_{1 - alpha/2}(n_o + n_r - 2) * sqrt(1/n_o + 1/n_r), 1) * s_pooled

(or one unit of the metrics' 4-decimal rounding, if larger), with alpha = 0.05 split over the
headline comparisons (Bonferroni): the two-sample t-test with pooled variance at that level,
never stricter than one seed standard deviation. PASS when every headline comparison is within
seed noise. Under the hypothesis being tested (two correct implementations: one distribution of
outcomes) the variances are equal, so the pooled test is the exact one; Welch's test, whose
p-value every row also shows, estimates its degrees of freedom from the two variances, which
with 2-3 seeds can fall to ~1 and then accepts differences of dozens of standard deviations.
The other metrics are reported with the same statistics, for information.

A model takes part through one function of its parity module,
`train_reference_to_early_stopping(side, point_cfg, dataset, dataset_dir, seed)`, which trains
its reference and returns a `RunOutcome` (usually by calling `fit_reference` here).
"""
import contextlib
import io
import math
import os
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
from scipy import stats

from lirdrec_jax import train
from lirdrec_jax.parity import reference

FAMILY_ALPHA = 0.05       # the chance that two correct implementations FAIL, at most
METRIC_RESOLUTION = 1e-4  # both sides round metrics to 4 decimals
REFERENCE_FUNCTION = 'train_reference_to_early_stopping'
SIDES = ('ours', 'reference')


class RunOutcome(NamedTuple):
    """One training run to early stopping.

    Attributes:
      epochs: epochs trained.
      best_epoch: the (0-based) epoch of the best valid score.
      valid, test: metrics at that epoch, keyed like 'recall@20'.
    """
    epochs: int
    best_epoch: int
    valid: Dict[str, float]
    test: Dict[str, float]


class Run(NamedTuple):
    """A finished run: which side, its seed, its outcome and its wall time."""
    side: str
    seed: int
    outcome: RunOutcome
    seconds: float


class MetricComparison(NamedTuple):
    """One metric@k of one split across seeds: ours against the reference.

    Attributes:
      ours, reference: the per-seed values of each side.
      p_value: Welch's two-sided t-test of equal means (shown, not used by the verdict).
      pooled_std: the pooled sample standard deviation of one run (`pooled_std`).
      allowed: the largest |mean difference| within seed noise (`allowed_difference`).
      headline: whether it decides the verdict.
      within_noise: |mean difference| <= allowed.
    """
    split: str
    metric: str
    ours: tuple
    reference: tuple
    p_value: float
    pooled_std: float
    allowed: float
    headline: bool
    within_noise: bool

    @property
    def difference(self) -> float:
        """mean(ours) - mean(reference)."""
        return float(np.mean(self.ours) - np.mean(self.reference))


class FullResult(NamedTuple):
    """Every run and every comparison of a `--full` invocation."""
    runs: List[Run]
    comparisons: List[MetricComparison]
    valid_metric: str
    passed: bool


# ----------------------------------------------------------------------------------------------
# Statistics and the verdict
# ----------------------------------------------------------------------------------------------

def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (ddof=1)."""
    return float(np.std(np.asarray(values, np.float64), ddof=1))


def pooled_std(a: Sequence[float], b: Sequence[float]) -> float:
    """The seed-to-seed spread of one run, both sides pooled:
    sqrt(((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2)), sqrt((s_a^2 + s_b^2) / 2) for
    equal sizes."""
    n_a, n_b = len(a), len(b)
    return math.sqrt(((n_a - 1) * sample_std(a) ** 2 + (n_b - 1) * sample_std(b) ** 2)
                     / (n_a + n_b - 2))


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test of equal means (`scipy.stats.ttest_ind` with
    equal_var=False). When both samples are constant the test is undefined (NaN): then equal
    means give 1 and different means 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return 1.0 if a[0] == b[0] else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # precision loss on near-equal data
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def allowed_difference(pooled: float, n_a: int, n_b: int, alpha: float) -> float:
    """The largest |mean difference| within seed noise: what the pooled two-sample t-test
    accepts at level `alpha`, t_{1-alpha/2}(n_a + n_b - 2) * sqrt(1/n_a + 1/n_b) * pooled, but
    at least one pooled standard deviation (a difference smaller than the spread of a single
    run is noise however many seeds show it) and one rounding unit of the metrics."""
    t = float(stats.t.ppf(1 - alpha / 2, n_a + n_b - 2))
    return max(max(t * math.sqrt(1 / n_a + 1 / n_b), 1.0) * pooled, METRIC_RESOLUTION)


def headline_metrics(valid_metric: str, available: Sequence[str]) -> tuple:
    """The metrics that decide the verdict: the valid metric and NDCG at its cutoff
    ('recall@20' -> ('recall@20', 'ndcg@20')), those of them the config computes."""
    valid_metric = valid_metric.lower()
    cutoff = valid_metric.split('@')[1]
    return tuple(dict.fromkeys(m for m in (valid_metric, f'ndcg@{cutoff}') if m in available))


def compare_runs(runs: Sequence[Run], valid_metric: str) -> List[MetricComparison]:
    """Every metric@k of valid and test, ours against the reference, in the config's order;
    the headline ones held to the family-wise level split over them (Bonferroni)."""
    by_side = {side: [r.outcome for r in runs if r.side == side] for side in SIDES}
    keys = list(by_side['ours'][0].valid)
    headline = headline_metrics(valid_metric, keys)
    alpha = headline_alpha(len(headline))
    out = []
    for split in ('valid', 'test'):
        for key in keys:
            ours = tuple(float(getattr(o, split)[key]) for o in by_side['ours'])
            ref = tuple(float(getattr(o, split)[key]) for o in by_side['reference'])
            pooled = pooled_std(ours, ref)
            allowed = allowed_difference(pooled, len(ours), len(ref), alpha)
            out.append(MetricComparison(split, key, ours, ref, welch_p_value(ours, ref), pooled,
                                        allowed, key in headline,
                                        abs(np.mean(ours) - np.mean(ref)) <= allowed))
    return out


def headline_alpha(n_headline_metrics: int) -> float:
    """The level of each headline comparison: FAMILY_ALPHA over the headline metrics on valid
    and test (Bonferroni), so that two correct implementations FAIL with probability at most
    FAMILY_ALPHA."""
    return FAMILY_ALPHA / (2 * n_headline_metrics)


def verdict(comparisons: Sequence[MetricComparison]) -> bool:
    """PASS when every headline comparison is within seed noise."""
    return all(c.within_noise for c in comparisons if c.headline)


# ----------------------------------------------------------------------------------------------
# The two sides
# ----------------------------------------------------------------------------------------------

def train_ours(point_cfg, prepared: train.PreparedData, seed: int) -> RunOutcome:
    """Our normal training of the grid point (`train.train_and_evaluate`) with train.seed =
    `seed`, checkpoints in a temporary folder. Its per-epoch lines are not shown: the full mode
    prints one line per run."""
    cfg = point_cfg.copy_and_resolve_references()
    cfg.train.seed = int(seed)
    with tempfile.TemporaryDirectory(prefix='lirdrec_full_') as workdir:
        with contextlib.redirect_stdout(io.StringIO()):
            result = train.train_and_evaluate(cfg, prepared, Path(workdir))
    return RunOutcome(int(result['epochs_done']), int(result['best_epoch']),
                      dict(result['best_valid']), dict(result['best_test']))


def seed_like_the_reference(seed: int) -> None:
    """What MMRec's `init_seed` seeds before each run: Python's, NumPy's and torch's global
    generators (the CUDA ones are irrelevant on the CPU)."""
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def reference_best_epoch(trainer) -> int:
    """The epoch of the reference trainer's best valid score, from its own state after `fit`:
    the last evaluated epoch minus `cur_step` (evaluations since the best) evaluation steps, as
    its 'best eval result in epoch' message computes it. -1 if it trained no epoch."""
    if not trainer.train_loss_dict:
        return -1
    step = int(trainer.eval_step)
    last_evaluated = (max(trainer.train_loss_dict) + 1) // step * step - 1
    return last_evaluated - int(trainer.cur_step) * step


def fit_reference(side, point_cfg, dataset, dataset_dir, seed: int,
                  make_loaders: Optional[Callable] = None) -> RunOutcome:
    """Train a reference model to early stopping as MMRec's `quick_start` does for one seed:
    loaders built, then `init_seed(seed)`, `train_data.pretrain_setup()`, the model, the
    trainer, `trainer.fit(train, valid, test)`.

    Args:
      side: the reference's model class and trainer factory (`common.ReferenceSide`). The
        trainer must have the reference's `fit` and keep its state in `train_loss_dict`,
        `cur_step`, `eval_step`, `best_valid_result`, `best_test_upon_valid`.
      point_cfg: our grid point (scalars); the reference's config dict is built from it
        (`reference.reference_config`: epochs, eval_step, stopping_step, valid_metric,
        learning rate and schedule, batch sizes, metrics, topk and the model's own keys).
      dataset, dataset_dir: our loaded dataset and its folder (the features are read there).
      make_loaders: `(config, dataset) -> (train, valid, test)`; by default the reference's own
        TrainDataLoader and EvalDataLoaders over our splits (`reference.reference_loaders`).
    """
    make_loaders = make_loaders or reference.reference_loaders
    staging = reference.staging_folder(dataset_dir, dataset.name, point_cfg.data.image_file,
                                       point_cfg.data.text_file)
    try:
        config = reference.reference_config(point_cfg, staging.name + os.sep, dataset.name)
        train_data, valid_data, test_data = make_loaders(config, dataset)
        seed_like_the_reference(seed)
        train_data.pretrain_setup()
        model = side.model_class(config, train_data)
        trainer = side.make_trainer(config, model)
        trainer.fit(train_data, valid_data=valid_data, test_data=test_data, saved=False)
    finally:
        staging.cleanup()
    lower = lambda result: {k.lower(): float(v) for k, v in result.items()}
    return RunOutcome(len(trainer.train_loss_dict), reference_best_epoch(trainer),
                      lower(trainer.best_valid_result), lower(trainer.best_test_upon_valid))


# ----------------------------------------------------------------------------------------------
# The loop and the report
# ----------------------------------------------------------------------------------------------

def run_line(run: Run, valid_metric: str) -> str:
    """One progress line: side, seed, epochs, best epoch, valid metric, wall time."""
    o = run.outcome
    return (f'{run.side:9s}  seed {run.seed:3d}  {o.epochs:4d} epochs  best epoch {o.best_epoch:4d}'
            f'  valid {valid_metric} {o.valid[valid_metric]:.4f}  {run.seconds:7.1f} s')


def run_full(seeds: Sequence[int], train_reference: Callable[[int], RunOutcome],
             train_ours_fn: Callable[[int], RunOutcome], valid_metric: str,
             log: Callable[[str], None] = print) -> FullResult:
    """Train both sides once per seed (the reference first), then compare.

    Args:
      seeds: at least two (Welch's test needs a spread on each side).
      train_reference, train_ours_fn: seed -> RunOutcome.
      valid_metric: the config's valid metric ('recall@20'), which picks the headline metrics.
    """
    if len(seeds) < 2:
        raise ValueError(f'--full needs at least 2 seeds per side (got {len(seeds)}): the '
                         'verdict compares the difference with the seed-to-seed spread')
    valid_metric = valid_metric.lower()
    runs = []
    for seed in seeds:
        for side, fn in (('reference', train_reference), ('ours', train_ours_fn)):
            start = time.perf_counter()
            outcome = fn(seed)
            runs.append(Run(side, int(seed), outcome, time.perf_counter() - start))
            log(run_line(runs[-1], valid_metric))
    comparisons = compare_runs(runs, valid_metric)
    return FullResult(runs, comparisons, valid_metric, verdict(comparisons))


def run_for_model(parity_module, side, point_cfg, dataset, dataset_dir,
                  seeds: Sequence[int], log: Callable[[str], None] = print) -> FullResult:
    """The driver's `--full`: the model's reference (its parity module's
    `train_reference_to_early_stopping`) against our training of `point_cfg`."""
    fit = getattr(parity_module, REFERENCE_FUNCTION, None)
    if fit is None:
        raise NotImplementedError(f'{parity_module.__name__} has no {REFERENCE_FUNCTION}(side, '
                                  'point_cfg, dataset, dataset_dir, seed): the model does not '
                                  'support --full yet')
    prepared = train.prepare_data(dataset, point_cfg.model_name)
    return run_full(seeds, lambda s: fit(side, point_cfg, dataset, dataset_dir, s),
                    lambda s: train_ours(point_cfg, prepared, s),
                    point_cfg.eval.valid_metric, log)


def _mean_std(values: Sequence[float], digits: int = 4) -> str:
    return f'{np.mean(values):.{digits}f} ± {sample_std(values):.{digits}f}'


def report(result: FullResult) -> str:
    """The table: per split and metric, each side's mean ± std over seeds, the difference, the
    pooled std, the allowed difference, Welch's p and whether the difference is within seed
    noise (headline rows marked *); then the epochs per side, the rule and the verdict."""
    n = {side: sum(r.side == side for r in result.runs) for side in SIDES}
    header = (f'{"":2s}{"split":6s}{"metric":13s}{"ours (mean ± std)":>20s}'
              f'{"reference (mean ± std)":>25s}{"ours - ref":>12s}{"pooled std":>12s}'
              f'{"allowed":>10s}{"Welch p":>10s}  within noise')
    lines = [f'end-to-end agreement over {n["ours"]} seeds per side, each side with its own '
             'initialisation, sampling and training loop, to early stopping', '',
             header, '-' * len(header)]
    for c in result.comparisons:
        lines.append(f'{"*" if c.headline else "":2s}{c.split:6s}{c.metric:13s}'
                     f'{_mean_std(c.ours):>20s}{_mean_std(c.reference):>25s}'
                     f'{c.difference:>+12.4f}{c.pooled_std:>12.4f}{c.allowed:>10.4f}'
                     f'{c.p_value:>10.3f}  '
                     f'{"yes" if c.within_noise else "NO"}')
    for label, field in (('epochs trained', 'epochs'), ('best epoch', 'best_epoch')):
        per_side = {side: [getattr(r.outcome, field) for r in result.runs if r.side == side]
                    for side in SIDES}
        lines.append(f'{label}: ours {_mean_std(per_side["ours"], 1)}, reference '
                     f'{_mean_std(per_side["reference"], 1)}')
    headline = [c for c in result.comparisons if c.headline]
    n_o, n_r = n['ours'], n['reference']
    alpha = headline_alpha(len({c.metric for c in headline}))
    factor = allowed_difference(1.0, n_o, n_r, alpha)
    lines.append(f'* headline metric. within noise: |ours - ref| <= allowed = {factor:.2f} x '
                 f'pooled std (pooled t-test at alpha = {FAMILY_ALPHA:g}/{len(headline)}, '
                 f'{n_o} + {n_r} seeds; at least 1 x pooled std and {METRIC_RESOLUTION:g})')
    lines.append('verdict: ' + ('PASS, every headline metric within seed noise'
                                if result.passed else
                                'FAIL: ' + ', '.join(f'{c.split} {c.metric}' for c in headline
                                                     if not c.within_noise)
                                + ' differ beyond seed noise'))
    return '\n'.join(lines)
