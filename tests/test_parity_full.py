"""End-to-end agreement (`python -m lirdrec_jax.parity --full`, lirdrec_jax/parity/full.py) in
CI: both sides trained to early stopping with their own random streams, against the
independent PyTorch restatement of LIRDRec (tests/torch_restatement.py) trained by a restated
MMRec loop (tests/torch_restated_fit.py); the table's numbers equal separate runs of each side,
a correct restatement PASSES and one that ranks items at random FAILS; the statistics against
hand computation."""
import functools
import math
import types

import numpy as np
import pytest
from scipy import stats

torch = pytest.importorskip('torch')

from configs import freedom as freedom_configs  # noqa: E402
from configs import test as test_config  # noqa: E402
from lirdrec_jax import data as data_lib  # noqa: E402
from lirdrec_jax import grid, models, synthetic, train  # noqa: E402
from lirdrec_jax.parity import full  # noqa: E402
from lirdrec_jax.parity import freedom as freedom_run  # noqa: E402
from lirdrec_jax.parity import lirdrec as run  # noqa: E402
from lirdrec_jax.parity.common import ReferenceSide  # noqa: E402
from tests import torch_freedom_reference as RF  # noqa: E402
from tests import torch_restatement as R  # noqa: E402
from tests.torch_restated_fit import FittingTrainer, restated_loaders  # noqa: E402

SEEDS = (0, 1)


@pytest.fixture(scope='module', autouse=True)
def one_torch_thread():
    # The torch side here is a few small matrices per step: one thread avoids the intra-op
    # pool's synchronisation, which dominates (and stalls on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp('parity_full')
    folder = synthetic.write_synthetic_dataset(root, 'small', n_users=300, n_items=150, seed=3,
                                               image_dim=48, text_dim=32)
    dataset = data_lib.load_mmrec(root, 'small')
    cfg = test_config.get_config()
    cfg.train.epochs, cfg.train.stopping_step = 3, 1
    cfg.data.data_dir, cfg.data.dataset = str(root), 'small'
    return dataset, folder, grid.expand_grid(cfg)[0].config


class ShuffledScores(R.RestatedLIRDRec):
    """Broken at evaluation only: every user's item scores permuted at random."""

    def full_sort_predict(self, interaction):
        scores = super().full_sort_predict(interaction)
        return scores[:, torch.randperm(scores.shape[1])]


def fit_restated(model_class, point, dataset, folder, seed):
    return run.train_reference_to_early_stopping(ReferenceSide(model_class, FittingTrainer),
                                                 point, dataset, folder, seed,
                                                 make_loaders=restated_loaders)


@pytest.fixture(scope='module')
def separate(small, tmp_path_factory):
    """Each side run on its own per seed: {side: [outcome per seed]}."""
    dataset, folder, point = small
    prepared = train.prepare_data(dataset, 'lirdrec')
    ours = []
    for seed in SEEDS:
        cfg = point.copy_and_resolve_references()
        cfg.train.seed = seed
        result = train.train_and_evaluate(cfg, prepared, tmp_path_factory.mktemp(f'ours{seed}'))
        ours.append(full.RunOutcome(result['epochs_done'], result['best_epoch'],
                                    result['best_valid'], result['best_test']))
    reference = [fit_restated(R.RestatedLIRDRec, point, dataset, folder, s) for s in SEEDS]
    return {'ours': ours, 'reference': reference}


@pytest.mark.filterwarnings('ignore:Precision loss:RuntimeWarning')
def test_full_mode_reports_the_separate_runs_and_passes(small, separate):
    dataset, folder, point = small
    module = types.SimpleNamespace(__name__='restated', train_reference_to_early_stopping=(
        lambda side, *args: fit_restated(side.model_class, *args)))
    lines = []
    result = full.run_for_model(module, ReferenceSide(R.RestatedLIRDRec, FittingTrainer),
                                point, dataset, folder, SEEDS, log=lines.append)
    # One progress line per run, the reference first for each seed.
    assert [line.split()[0] for line in lines] == ['reference', 'ours'] * 2
    # Every metric of every run is that of the separate run with the same seed, and the seed
    # matters on each side.
    for side in full.SIDES:
        runs = [r.outcome for r in result.runs if r.side == side]
        assert runs == separate[side], side
        assert runs[0].valid != runs[1].valid, side
    comparisons = {(c.split, c.metric): c for c in result.comparisons}
    assert len(comparisons) == 2 * 4 * 4  # valid/test x 4 metrics x 4 cutoffs
    for (split, metric), c in comparisons.items():
        ours = [getattr(o, split)[metric] for o in separate['ours']]
        ref = [getattr(o, split)[metric] for o in separate['reference']]
        assert c.ours == tuple(ours) and c.reference == tuple(ref)
        assert c.difference == pytest.approx(np.mean(ours) - np.mean(ref), abs=1e-12)
        scipy_p = stats.ttest_ind(ours, ref, equal_var=False).pvalue
        assert c.p_value == pytest.approx(scipy_p) if np.isfinite(scipy_p) else c.p_value in (0, 1)
    assert {m for (_, m), c in comparisons.items() if c.headline} == {'recall@20', 'ndcg@20'}
    # The table prints those numbers.
    table = full.report(result)
    c = comparisons[('test', 'recall@20')]
    row = next(line for line in table.splitlines() if line.startswith('* test  recall@20 '))
    assert f'{np.mean(c.ours):.4f} ± {np.std(c.ours, ddof=1):.4f}' in row
    assert f'{np.mean(c.reference):.4f} ± {np.std(c.reference, ddof=1):.4f}' in row
    assert f'{c.p_value:.3f}' in row
    # A correct restatement agrees within seed noise.
    assert result.passed, table
    assert table.splitlines()[-1].startswith('verdict: PASS')


def test_full_mode_fails_against_a_reference_that_ranks_at_random(small, separate):
    dataset, folder, point = small
    ours = dict(zip(SEEDS, separate['ours']))  # our side as in the separate runs
    result = full.run_full(SEEDS, functools.partial(fit_restated, ShuffledScores, point,
                                                    dataset, folder),
                           ours.__getitem__, 'recall@20', log=lambda _: None)
    assert not result.passed
    failed = {(c.split, c.metric) for c in result.comparisons if c.headline and not c.within_noise}
    assert failed == {(s, m) for s in ('valid', 'test') for m in ('recall@20', 'ndcg@20')}
    assert 'verdict: FAIL' in full.report(result).splitlines()[-1]


def test_reference_best_epoch_matches_the_trainers_own_record(small):
    dataset, folder, point = small
    side = ReferenceSide(R.RestatedLIRDRec, FittingTrainer)
    trainers = []

    def make_trainer(config, model):
        trainers.append(FittingTrainer(config, model))
        return trainers[-1]

    outcome = run.train_reference_to_early_stopping(side._replace(make_trainer=make_trainer),
                                                    point, dataset, folder, 3,
                                                    make_loaders=restated_loaders)
    assert outcome.best_epoch == trainers[0].best_epoch >= 0
    assert outcome.epochs == len(trainers[0].train_loss_dict)
    # By hand: 10 epochs, evaluated every 2nd (epochs 1, 3, 5, 7, 9), 2 stale since the best.
    state = types.SimpleNamespace(train_loss_dict=dict.fromkeys(range(10)), eval_step=2,
                                  cur_step=2)
    assert full.reference_best_epoch(state) == 5
    # A last epoch that is not evaluated (epoch 10 of 11) does not count.
    state.train_loss_dict[10] = None
    assert full.reference_best_epoch(state) == 5


def test_freedom_reference_trains_with_its_own_streams(tmp_path):
    # FREEDOM's function, on its restatement: its own pruned graphs and negatives per seed.
    root = tmp_path
    synthetic.write_synthetic_dataset(root, 'tiny', n_users=120, n_items=60, seed=5,
                                      image_dim=16, text_dim=8)
    dataset = data_lib.load_mmrec(root, 'tiny')
    cfg = freedom_configs.get_config()
    cfg.model.embedding_size, cfg.model.knn_k = 8, 5
    cfg.optim.learning_rate = (0.01,)
    cfg.train.epochs, cfg.train.stopping_step, cfg.train.batch_size = 3, 1, 256
    cfg.data.data_dir, cfg.data.dataset = str(root), 'tiny'
    point = grid.expand_grid(cfg)[0].config
    fit = functools.partial(freedom_run.train_reference_to_early_stopping,
                            ReferenceSide(RF.RestatedFREEDOM, FittingTrainer), point, dataset,
                            root / 'tiny', make_loaders=restated_loaders)
    first, again, other = fit(seed=0), fit(seed=0), fit(seed=1)
    assert first == again
    assert first.valid != other.valid
    assert set(first.test) == {f'{m}@{k}' for m in ('recall', 'ndcg', 'precision', 'map')
                               for k in (5, 10, 20, 50)}


# Models whose parity module has no end-to-end mode yet (DGVAE's reference is its own
# pipeline, not MMRec's trainer): --full must stop with a clear message for them.
WITHOUT_FULL_MODE = ('dgvae',)


def test_every_registered_model_supports_full_mode():
    import importlib
    for name, model in models.REGISTRY.items():
        module = importlib.import_module(model.parity.module)
        supported = callable(getattr(module, full.REFERENCE_FUNCTION, None))
        assert supported == (name not in WITHOUT_FULL_MODE), name
        if not supported:
            with pytest.raises(NotImplementedError, match='does not support --full'):
                full.run_for_model(module, None, None, None, None, [0, 1])


def test_statistics_and_verdict_by_hand():
    ours, ref = [0.40, 0.42, 0.44], [0.30, 0.31, 0.32]
    # Welch by hand: t = (m1 - m2) / sqrt(v1/n + v2/n), Welch-Satterthwaite degrees of freedom.
    v1, v2, n = 0.0004, 0.0001, 3
    se2 = v1 / n + v2 / n
    t = 0.11 / math.sqrt(se2)
    df = se2 ** 2 / ((v1 / n) ** 2 / (n - 1) + (v2 / n) ** 2 / (n - 1))
    assert t == pytest.approx(8.5206, abs=1e-4) and df == pytest.approx(2.9412, abs=1e-4)
    p = 2 * stats.t.sf(t, df)
    assert full.welch_p_value(ours, ref) == pytest.approx(p, rel=1e-9)
    assert p == pytest.approx(0.0036, abs=1e-4)
    pooled = math.sqrt((v1 + v2) / 2)
    assert full.pooled_std(ours, ref) == pytest.approx(pooled)
    # Allowed difference with 3 + 3 seeds at 0.05/4: t_{1 - 0.00625}(4) sqrt(2/3) = 3.5229 stds.
    alpha = full.headline_alpha(2)
    assert alpha == 0.0125
    assert full.allowed_difference(pooled, 3, 3, alpha) == pytest.approx(3.5229 * pooled,
                                                                         rel=1e-4)
    # With 2 + 2 seeds: t_{1 - 0.00625}(2) = 8.860.
    assert full.allowed_difference(1.0, 2, 2, alpha) == pytest.approx(8.860, abs=1e-3)
    # Never below one pooled std (20 + 20 seeds: the t-test alone would allow 0.829 stds), nor
    # below one rounding unit.
    assert full.allowed_difference(0.01, 20, 20, alpha) == pytest.approx(0.01)
    assert full.allowed_difference(0.0, 3, 3, alpha) == 1e-4

    # Why not Welch: with 2 seeds and unequal spreads its degrees of freedom fall to ~1, and a
    # difference of 30 pooled stds (the must-fail test's random ranking) has p = 0.017 > alpha.
    tight, broken = [0.318, 0.321], [0.066, 0.082]
    assert full.welch_p_value(tight, broken) == pytest.approx(0.0169, abs=1e-4)
    outcome = lambda r, nd, x: full.RunOutcome(5, 4, {'recall@20': r, 'ndcg@20': nd, 'map@5': x},
                                               {'recall@20': r, 'ndcg@20': nd, 'map@5': x})
    runs = [full.Run('ours', s, outcome(r, 0.2, 0.1), 1.0) for s, r in enumerate(tight)]
    runs += [full.Run('reference', s, outcome(r, 0.2, 0.1), 1.0) for s, r in enumerate(broken)]
    comparisons = full.compare_runs(runs, 'Recall@20')
    recall = comparisons[0]
    assert (recall.split, recall.metric, recall.headline) == ('valid', 'recall@20', True)
    assert recall.allowed == pytest.approx(8.860 * full.pooled_std(tight, broken), rel=1e-4)
    assert not recall.within_noise and not full.verdict(comparisons)

    # The verdict reads the headline rows only: map@5 differs, recall and NDCG by one std.
    runs = [full.Run('ours', s, outcome(0.40 + d, 0.20 + d, 0.1 + d), 1.0)
            for s, d in enumerate((0.0, 0.01, 0.02))]
    runs += [full.Run('reference', s, outcome(0.41 + d, 0.21 + d, 0.9 + d), 1.0)
             for s, d in enumerate((0.0, 0.01, 0.02))]
    comparisons = full.compare_runs(runs, 'Recall@20')
    assert [(c.split, c.metric) for c in comparisons if c.headline] == [
        ('valid', 'recall@20'), ('valid', 'ndcg@20'), ('test', 'recall@20'), ('test', 'ndcg@20')]
    map5 = next(c for c in comparisons if c.metric == 'map@5' and c.split == 'valid')
    assert not map5.headline and not map5.within_noise
    assert full.verdict(comparisons)
