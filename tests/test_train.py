"""Training loop: resume reproduces the uninterrupted run, checkpoints survive a killed save,
early stopping follows the reference's rule, the PWC state is folded in between epochs."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from lirdrec_jax import checkpointing, grid, optim, parallel, sampling, train
from lirdrec_jax.data import Interactions, MMRecDataset
from lirdrec_jax.models import lirdrec


def tiny_dataset(seed=0, n_users=60, n_items=70):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), 8)
    items = (users * 7 + rng.integers(0, 12, users.size)) % n_items
    label = np.tile([0, 0, 0, 0, 0, 0, 1, 2], n_users)
    split = lambda k: Interactions(users[label == k].astype(np.int32),
                                   items[label == k].astype(np.int32))
    factors = rng.standard_normal((n_items, 4))
    image = np.abs(factors @ rng.standard_normal((4, 12))).astype(np.float32) + 0.1
    text = (factors @ rng.standard_normal((4, 6))).astype(np.float32)
    return MMRecDataset('tiny', n_users, n_items, split(0), split(1), split(2), image, text)


@pytest.fixture(scope='module')
def prepared():
    return train.prepare_data(tiny_dataset(), 'lirdrec')


def point_config(**train_overrides):
    cfg = test_config.get_config()
    for k, v in train_overrides.items():
        cfg.train[k] = v
    return grid.expand_grid(cfg)[0].config


@pytest.fixture(scope='module')
def full_run(prepared, tmp_path_factory):
    """An uninterrupted run of 4 epochs: (config, directory, result). Shared, read-only, by the
    tests that compare with it or look at its files."""
    cfg = point_config(epochs=4, stopping_step=10)
    workdir = tmp_path_factory.mktemp('full_run')
    return cfg, workdir, train.train_and_evaluate(cfg, prepared, workdir)


def assert_same_run(resumed, full):
    assert resumed['best_valid'] == full['best_valid']
    assert resumed['best_test'] == full['best_test']
    assert [h['loss'] for h in resumed['history']] == [h['loss'] for h in full['history']]
    # The runs are not trivially equal: training changed the loss across epochs.
    assert len({round(h['loss'], 6) for h in full['history']}) > 1


def metrics_epochs(workdir):
    lines = (workdir / 'metrics.jsonl').read_text().splitlines()
    return [json.loads(l)['epoch'] for l in lines]


def test_resume_trains_only_the_remaining_epochs_to_the_uninterrupted_metrics(
        prepared, full_run, tmp_path, training_log):
    cfg, _, full = full_run
    part = train.train_and_evaluate(cfg, prepared, tmp_path, stop_after_epochs=2)
    assert not part['finished'] and part['epochs_done'] == 2
    assert training_log.epoch_numbers == [0, 1]
    training_log.clear()
    resumed = train.train_and_evaluate(cfg, prepared, tmp_path, resume=True)
    # From the checkpoint after epoch 1 (a resume that retrained from scratch would reach the
    # same numbers, since training is a function of seed and epoch).
    assert training_log.epoch_numbers == [2, 3]
    assert resumed['finished'] and resumed['epochs_done'] == 4
    assert_same_run(resumed, full)
    assert metrics_epochs(tmp_path) == [0, 1, 2, 3]


def test_a_save_killed_midway_leaves_the_previous_checkpoint_usable(prepared, full_run, tmp_path,
                                                                    training_log):
    cfg, _, full = full_run
    train.train_and_evaluate(cfg, prepared, tmp_path, stop_after_epochs=2)
    last = tmp_path / 'ckpt' / 'last'
    assert sorted(p.name for p in last.iterdir() if p.name.isdigit()) == ['1', '2']
    # What a save killed halfway leaves behind: an orbax temporary directory for epoch 3
    # holding partial files.
    debris = last / '3.orbax-checkpoint-tmp-1234567890'
    shutil.copytree(last / '2', debris)
    for f in list(debris.rglob('*'))[:3]:
        if f.is_file():
            f.write_bytes(b'partial')
    training_log.clear()
    resumed = train.train_and_evaluate(cfg, prepared, tmp_path, resume=True)
    assert training_log.epoch_numbers == [2, 3]
    assert resumed['epochs_done'] == 4
    assert_same_run(resumed, full)


def test_keep_last_n_and_best(full_run):
    _, workdir, result = full_run
    kept = sorted(int(p.name) for p in (workdir / 'ckpt' / 'last').iterdir() if p.name.isdigit())
    assert kept == [3, 4]  # keep_last = 2 in configs/test.py
    best = [int(p.name) for p in (workdir / 'ckpt' / 'best').iterdir() if p.name.isdigit()]
    assert best == [result['best_epoch'] + 1]  # directories count epochs done
    assert metrics_epochs(workdir) == [0, 1, 2, 3]


def test_theta_is_overwritten_with_the_last_attention_at_epoch_start(prepared, full_run):
    cfg, workdir, _ = full_run
    ckpts = checkpointing.RunCheckpoints(workdir / 'ckpt', 2)
    net = lirdrec.create(cfg.model, prepared.dataset.n_users, prepared.dataset.n_items)
    opt = optim.create_optimizer()
    frozen = lirdrec.Frozen(prepared.model.features, prepared.model.user_item,
                            lirdrec.item_graph(prepared.model, cfg.model.knn_k, 0.1))
    params, carry = lirdrec.init(jax.random.PRNGKey(0), net, frozen, frozen)
    template = train.TrainState(params, opt.init(params), carry)
    saved, progress = ckpts.restore(train.state_to_save(template, jax.random.PRNGKey(0),
                                                        parallel.Partitioner(1)))
    ckpts.close()
    att = np.asarray(saved['carry'].attention)
    theta = np.asarray(saved['params']['fusion']['theta'])
    # After epoch 4, theta is epoch 3's last attention moved by epoch 4's Adam steps: close to
    # a probability table (rows near summing to 1), unlike its xavier-normal init.
    np.testing.assert_allclose(att.sum(1), 1, rtol=1e-5)
    assert np.abs(theta.sum(1) - 1).max() < 0.1
    # PWC weights after four epochs: (0.9, 0.1) -> epoch 1 -> ... -> epoch 4, as the hand
    # schedule.
    w1, w2 = 0.9, 0.1
    for epoch in range(1, 5):  # w1 <- w1 * 0.9**epoch, then both renormalised
        w1 *= 0.9 ** epoch
        w1, w2 = w1 / (w1 + w2), w2 / (w1 + w2)
    assert (progress['model_state']['w1'], progress['model_state']['w2']) == \
        pytest.approx((w1, w2))


def test_early_stopping_rule():
    progress = train.Progress(epochs_done=0, model_state={'w1': 0.9, 'w2': 0.1})
    seq = [0.1, 0.2, 0.2, 0.15, 0.21, 0.2, 0.2, 0.2]
    flags = [train.early_stopping(progress, v, stopping_step=2) for v in seq]
    # Improved at 0.1, 0.2, 0.21 (an equal score is not better); the run stops when the
    # counter exceeds 2, i.e. at the third evaluation in a row without improvement.
    assert [f[0] for f in flags] == [True, True, False, False, True, False, False, False]
    assert [f[1] for f in flags] == [False] * 7 + [True]
    assert progress.best_valid_score == 0.21


def test_divergence_names_epoch_and_batch(prepared, tmp_path):
    cfg = point_config(epochs=1)
    cfg.optim.learning_rate = 1e30
    with pytest.raises(train.TrainingDiverged, match=r'epoch 0, batch \d+'):
        train.train_and_evaluate(cfg, prepared, tmp_path)


def test_train_step_compiles_once_across_epochs_with_edge_dropout(prepared):
    """New dropout graphs, PWC weights and learning rates every epoch reuse one compilation."""
    cfg = point_config(epochs=3)
    cfg.model.dropout = 0.3
    partitioner = parallel.Partitioner(1)
    setup = train.setup_point(cfg, prepared, partitioner)
    fns = train.make_epoch_fns(setup, partitioner, 'last_batch')
    state = setup.state
    n_edges = prepared.model.edges.users.shape[0]
    for epoch in range(3):
        user_item = lirdrec.epoch_inputs(prepared.model, cfg.model, jax.random.PRNGKey(epoch),
                                         epoch)
        assert user_item.nse == 2 * int(n_edges * 0.7)
        epoch_inputs = train.place_epoch_inputs(partitioner, user_item, setup.options)
        scalars = train.device_scalars(dict(zip(('w1', 'w2', 'learning_rate', 'reg_weight'),
                                                (0.9 - epoch / 10, 0.1, 1e-3, 1e-3))))
        batches = sampling.epoch_batches(sampling.epoch_rng(0, epoch), prepared.sampler, 64)
        state, losses = train.run_epoch(fns, state, batches, setup.frozen, epoch_inputs, scalars,
                                        jax.random.fold_in(setup.epoch_key, epoch), None, epoch,
                                        partitioner, False)
        loss = train.summed_loss(losses, epoch)
        assert np.isfinite(loss)
    assert batches.users.shape[0] > 2
    assert fns.step._cache_size() == 1


def test_fresh_evaluation_uses_the_epochs_final_parameters(prepared, full_run, tmp_path):
    cfg = point_config(epochs=1)
    cfg.eval.embeddings = 'fresh'
    result = train.train_and_evaluate(cfg, prepared, tmp_path)
    from lirdrec_jax import evaluation
    net = lirdrec.create(cfg.model, prepared.dataset.n_users, prepared.dataset.n_items)
    graphs = lirdrec.Graphs(prepared.model.user_item,
                            lirdrec.item_graph(prepared.model, cfg.model.knn_k, 0.1))
    frozen = lirdrec.Frozen(prepared.model.features, *graphs)
    params, carry = lirdrec.init(jax.random.PRNGKey(0), net, frozen, frozen)
    template = train.TrainState(params, optim.create_optimizer().init(params), carry)
    ckpts = checkpointing.RunCheckpoints(tmp_path / 'ckpt', 2)
    saved, progress = ckpts.restore(train.state_to_save(template, jax.random.PRNGKey(0),
                                                        parallel.Partitioner(1)))
    ckpts.close()
    users, items, _ = net.apply({'params': saved['params']}, prepared.model.features, graphs,
                                progress['model_state']['w1'], progress['model_state']['w2'])
    expected = evaluation.evaluate_full_sort(users, items, prepared.valid)
    assert result['history'][0]['valid'] == expected
    # ... and differs from the reference's default (embeddings of the last training forward),
    # with which the shared run's first epoch was evaluated.
    default = full_run[2]
    assert full_run[0].eval.get('embeddings', 'last_batch') == 'last_batch'
    assert default['history'][0]['loss'] == result['history'][0]['loss']
    assert default['history'][0]['valid'] != result['history'][0]['valid']


@pytest.mark.parametrize('section,field,value,message', [
    ('eval', 'embeddings', 'latest', "eval.embeddings = 'latest'; expected one of"),
    ('eval', 'valid_metric', 'recall@30', "eval.valid_metric = 'recall@30'"),
    ('model', 'dropout', 1.0, 'model.dropout = 1.0; expected in'),
    ('model', 'knn_k', 500, 'model.knn_k = 500; expected in'),
])
def test_bad_config_values_name_the_field(prepared, tmp_path, section, field, value, message):
    cfg = point_config(epochs=1)
    cfg[section][field] = value
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(cfg, prepared, tmp_path)


@pytest.mark.parametrize('section,field,value,message', [
    ('model', 'matmul_dtype', 'float16', "model.matmul_dtype = 'float16'; expected one of"),
    ('graph', 'spmm_impl', 'dense', "graph.spmm_impl = 'dense'; expected one of"),
    ('graph', 'spmm_chunk_size', -5, 'graph.spmm_chunk_size = -5; expected'),
    ('model', 'cpu_dot', 'mkl', "model.cpu_dot = 'mkl'; expected one of"),
])
def test_bad_speed_options_name_the_field(prepared, tmp_path, section, field, value, message):
    cfg = point_config(epochs=1)
    cfg[section][field] = value
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(cfg, prepared, tmp_path)


def test_speed_options_keep_the_numbers(prepared, full_run, tmp_path):
    """The chunked sparse product, per-batch dispatch (instead of the default scanned epochs)
    and transposed feature copies agree with the default to float32 rounding (the same
    metrics); bfloat16 towers stay close. Two epochs each, against the first two of the shared
    default run (an epoch depends only on the ones before it)."""
    def history(name, **changes):
        cfg = point_config(epochs=2, stopping_step=10)
        for dotted, v in changes.items():
            section, field = dotted.split('__')
            cfg[section][field] = v
        out = train.train_and_evaluate(cfg, prepared, tmp_path / name)['history']
        return [h['loss'] for h in out], [(h['valid'], h['test']) for h in out]

    base = ([h['loss'] for h in full_run[2]['history'][:2]],
            [(h['valid'], h['test']) for h in full_run[2]['history'][:2]])
    for name, changes in [('segment_sum', dict(graph__spmm_impl='segment_sum',
                                               graph__spmm_chunk_size=7)),
                          ('one dispatch per batch', dict(train__scan_epoch=False)),
                          ('transposed', dict(model__transposed_features=True)),
                          ('eigen dots', dict(model__cpu_dot='eigen'))]:
        losses, metrics = history(name, **changes)
        np.testing.assert_allclose(losses, base[0], rtol=1e-5, err_msg=name)
        assert metrics == base[1], name
    losses, _ = history('bf16', model__matmul_dtype='bfloat16')
    np.testing.assert_allclose(losses, base[0], rtol=2e-2)
    assert losses != base[0]  # bfloat16 really is in use


def test_eigen_cpu_dots_need_float32_towers(prepared, tmp_path):
    cfg = point_config(epochs=1)
    cfg.model.cpu_dot, cfg.model.matmul_dtype = 'eigen', 'bfloat16'
    with pytest.raises(ValueError, match="model.cpu_dot = 'eigen'; expected 'xla' with "
                                         "model.matmul_dtype='bfloat16'"):
        train.train_and_evaluate(cfg, prepared, tmp_path)


def test_cpu_dot_option_reaches_the_compiled_step(prepared):
    """'eigen' compiles the training step without YNNPACK dot fusions; 'xla' leaves XLA's
    choice (which, on this jaxlib's CPU backend, fuses the dots into YNNPACK calls)."""
    if jax.default_backend() != 'cpu':
        pytest.skip('a CPU-only option')
    texts = {}
    for cpu_dot in ('xla', 'eigen'):
        cfg = point_config()
        cfg.model.cpu_dot = cpu_dot
        partitioner = parallel.Partitioner(1)
        setup = train.setup_point(cfg, prepared, partitioner)
        batch = sampling.EpochBatches(*(np.zeros(8, np.int32),) * 3, np.ones(8, np.float32))
        step = train.make_epoch_fns(setup, partitioner, 'last_batch').step
        scalars = train.device_scalars({'w1': 0.9, 'w2': 0.1, 'learning_rate': 1e-3,
                                        'reg_weight': 1e-3})
        texts[cpu_dot] = step.lower(setup.state, batch, setup.frozen, None, scalars,
                                    setup.epoch_key, jnp.int32(0), None).compile().as_text()
    assert train.run_options(point_config()).compiler_options is None
    assert ' dot(' in texts['eigen'] and 'ynn_fusion' not in texts['eigen']
    if 'ynn_fusion' not in texts['xla']:
        pytest.skip("this jaxlib's XLA:CPU does not use YNNPACK dot fusions")


# ----------------------------------------------------------------------------------------------
# Optimiser and evaluation options
# ----------------------------------------------------------------------------------------------

def test_learning_rate_decays_per_epoch_as_configured(prepared, full_run, tmp_path, training_log):
    """lr * factor ** (epoch / lr_decay_epochs), 0-based epoch (the reference's LambdaLR): with
    0.005, factor 0.25 and every 2 epochs the epochs train at 0.005, 0.0025, 0.00125."""
    cfg = point_config(epochs=3, stopping_step=10)
    cfg.optim.lr_decay_factor, cfg.optim.lr_decay_epochs = 0.25, 2.0
    result = train.train_and_evaluate(cfg, prepared, tmp_path)
    hand = [0.005, 0.0025, 0.00125]
    records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert [r['learning_rate'] for r in records] == pytest.approx(hand, rel=1e-12)
    # The step is given these rates ...
    np.testing.assert_allclose(np.ravel(training_log.learning_rates), hand, rtol=1e-7)
    # ... and uses them: epoch 0 trains as without decay, the later epochs differ.
    losses = [h['loss'] for h in result['history']]
    undecayed = [h['loss'] for h in full_run[2]['history'][:3]]
    assert losses[0] == undecayed[0]
    assert losses[1] != undecayed[1] and losses[2] != undecayed[2]
    # The model's own schedule goes on beside it (LIRDRec's PWC weights, by hand).
    w1, w2 = 0.9, 0.1
    for epoch, record in enumerate(records):
        w1 *= 0.9 ** (epoch + 1)
        w1, w2 = w1 / (w1 + w2), w2 / (w1 + w2)
        assert (record['w1'], record['w2']) == pytest.approx((w1, w2), rel=1e-12)


@pytest.mark.parametrize('model_name', ['lirdrec', 'freedom'])
def test_every_model_trains_at_the_trainers_learning_rate(model_name):
    """Each model's epoch_schedule supplies its own scalars; the learning rate is the trainer's
    schedule whatever the model."""
    from lirdrec_jax import models
    from configs import freedom as freedom_config
    cfg = (test_config.get_config() if model_name == 'lirdrec'
           else freedom_config.get_config('synthetic'))
    cfg.optim.learning_rate = (0.01,)
    cfg.optim.lr_decay_factor, cfg.optim.lr_decay_epochs = 0.5, 3.0
    cfg = grid.expand_grid(cfg)[0].config
    model = models.get_model(model_name)
    host = model.host_init(cfg.model)
    for epoch in range(4):
        host, scalars = train.epoch_scalars(model, cfg, host, epoch)
        assert scalars['learning_rate'] == pytest.approx(0.01 * 0.5 ** (epoch / 3), rel=1e-12)
        assert scalars['reg_weight'] == cfg.model.reg_weight


def test_weight_decay_is_l2_added_to_the_gradient_before_adam(prepared):
    """optim.weight_decay = wd: PyTorch's Adam(weight_decay=wd), i.e. Adam on g + wd * p (not
    AdamW's decoupled decay). Two steps worked out by hand, through the point's optimiser."""
    lr, wd, b1, b2, eps = 0.1, 0.5, 0.9, 0.999, 1e-8
    p0 = np.array([1.0, -2.0, 0.5, 4.0])
    g = [np.array([0.1, 0.3, -0.2, -1.0]), np.array([-0.4, 0.2, 0.1, 0.5])]

    def by_hand(decay):
        p, m, v = p0.copy(), 0.0, 0.0
        for t, grad in enumerate(g, start=1):
            grad = grad + decay * p
            m = b1 * m + (1 - b1) * grad
            v = b2 * v + (1 - b2) * grad ** 2
            p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        return p

    def through_trainer(decay):
        cfg = point_config()
        cfg.optim.weight_decay = decay
        optimizer = train.setup_point(cfg, prepared, parallel.Partitioner(1)).optimizer
        params = {'w': jnp.asarray(p0, jnp.float32)}
        state = optimizer.init(params)
        for grad in g:
            params, state = train.apply_gradients(optimizer, params, state,
                                                  {'w': jnp.asarray(grad, jnp.float32)}, lr)
        return np.asarray(params['w'])

    # (float32: Adam's bias corrections 1 - 0.999**t carry relative errors near 1e-5.)
    np.testing.assert_allclose(through_trainer(wd), by_hand(wd), atol=1e-5)
    np.testing.assert_allclose(through_trainer(0.0), by_hand(0.0), atol=1e-5)
    # The decay changes the update (the first step's direction flips where wd * p outweighs g).
    assert np.abs(by_hand(wd) - by_hand(0.0)).min() > 0.05


def test_evaluation_every_eval_step_epochs_and_early_stopping_counts_evaluations(
        prepared, tmp_path, monkeypatch):
    """eval_step = 2: epochs 1, 3, 5, ... (0-based) are evaluated; stopping_step = 1 stops at the
    second evaluation in a row without a better valid score. The scores are scripted so that
    the rule can be followed by hand: 0.1, 0.2 (better), 0.15, 0.15 (two without improvement:
    stop after epoch 7)."""
    scores = iter([0.1, 0.2, 0.15, 0.15, 0.3, 0.4])
    evaluated = []

    def scripted(user_emb, item_emb, data, e, partitioner, per_user=False):
        score = next(scores)
        evaluated.append(score)
        split = {f'{m}@{k}': score for m in e.metrics for k in e.topk}
        users = {'users': np.arange(3), **{k: np.full(3, v / 2) for k, v in split.items()}}
        return split, {k: v / 2 for k, v in split.items()}, users

    monkeypatch.setattr(train, 'evaluate_splits', scripted)
    cfg = point_config(epochs=12, stopping_step=1, eval_step=2)
    result = train.train_and_evaluate(cfg, prepared, tmp_path)
    assert evaluated == [0.1, 0.2, 0.15, 0.15]
    assert result['finished'] and result['epochs_done'] == 8
    assert result['best_epoch'] == 3 and result['best_valid']['recall@20'] == 0.2
    assert result['best_test']['recall@20'] == 0.1
    records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == list(range(8))
    assert [r['epoch'] for r in records if 'valid' in r] == [1, 3, 5, 7]
    # The best checkpoint is the one after epoch 3 (4 epochs done).
    assert [p.name for p in (tmp_path / 'ckpt' / 'best').iterdir() if p.name.isdigit()] == ['4']
    # The per-user test values kept are those of the best epoch (0.2 / 2), and only they.
    with np.load(tmp_path / 'test_users.npz') as saved:
        assert int(saved['epoch']) == 3 and np.all(saved['recall@20'] == 0.1)
    assert sorted(p.name for p in tmp_path.glob('test_users*')) == ['test_users.npz']
