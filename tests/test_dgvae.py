"""DGVAE (lirdrec_jax/models/dgvae.py): its pieces against hand computation, the sparse graph
propagation against the reference's dense product, the on-device user rows against scipy, the
padding rows, the annealing counter, the config checks, and a short run that learns.
(The whole loss, its gradients and Adam steps against an independent PyTorch statement:
tests/test_parity_dgvae.py.)"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

from configs import dgvae as dgvae_configs
from lirdrec_jax import evaluation, graph, model_inputs, sampling, synthetic, train, word_view
from lirdrec_jax.models import dgvae

softplus = lambda x: math.log1p(math.exp(x))
sigmoid = lambda x: 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------------------------
# Pieces by hand
# ----------------------------------------------------------------------------------------------

def test_kl_rows_by_hand():
    # K = 2 factors, one row, d = 2: KL_k = -1/2 sum_d (1 + lv - e^lv), summed over k.
    logvar = np.array([[[0.5, -1.0]], [[0.0, 2.0]]], np.float32)
    k0 = -0.5 * ((1 + 0.5 - math.exp(0.5)) + (1 - 1.0 - math.exp(-1.0)))  # 0.258300
    k1 = -0.5 * ((1 + 0.0 - 1.0) + (1 + 2.0 - math.exp(2.0)))             # 2.194528
    np.testing.assert_allclose(dgvae.kl_rows(jnp.asarray(logvar)), [k0 + k1], rtol=1e-6)


def test_mutual_information_by_hand():
    # K = 2, d = 2, one row. a_k . b_j: s00 = 1, s01 = 0.6, s10 = 0, s11 = 0.8.
    a = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
    b = np.array([[[1.0, 0.0], [0.6, 0.8]]], np.float32)
    k0 = softplus(0.6) + softplus(-1.0)  # negative: the other factor; positive: its own
    k1 = softplus(0.0) + softplus(-0.8)
    np.testing.assert_allclose(dgvae.mutual_information_rows(jnp.asarray(a), jnp.asarray(b)),
                               [(k0 + k1) / 2], rtol=1e-6)
    # K = 3: the negative term averages over the two other factors.
    a3 = np.array([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]], np.float32)
    s = a3[0] @ a3[0].T
    want = sum((sum(softplus(s[i, j]) for j in range(3) if j != i) / 2 + softplus(-s[i, i]))
               for i in range(3)) / 3
    np.testing.assert_allclose(dgvae.mutual_information_rows(jnp.asarray(a3), jnp.asarray(a3)),
                               [want], rtol=1e-6)


def test_co_attention_by_hand():
    q = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
    k = np.array([[[0.6, 0.8], [1.0, 0.0]]], np.float32)
    v = np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32)
    # L1 distances: |q0-k0| = 0.4+0.8 = 1.2, |q0-k1| = 0, |q1-k0| = 0.6+0.2 = 0.8,
    # |q1-k1| = 1+1 = 2. Row means of -L1: q0: -0.6, q1: -1.4.
    # Dots: q0.k0 = 0.6, q0.k1 = 1, q1.k0 = 0.8, q1.k1 = 0.
    w00 = math.tanh(0.6) * sigmoid(-1.2 + 0.6)
    w01 = math.tanh(1.0) * sigmoid(0.0 + 0.6)
    w10 = math.tanh(0.8) * sigmoid(-0.8 + 1.4)
    w11 = math.tanh(0.0) * sigmoid(-2.0 + 1.4)  # 0
    want = [[w00 * 1 + w01 * 3, w00 * 2 + w01 * 4], [w10 * 1 + w11 * 3, w10 * 2 + w11 * 4]]
    got = dgvae.co_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    np.testing.assert_allclose(got[0], want, rtol=1e-6)


def test_decoder_is_the_mixture_over_factors():
    # One user, K = 2, d = 1, two items; tau = 0.5.
    z = np.array([[[1.0], [-1.0]]], np.float32)
    items = np.array([[1.0], [0.5]], np.float32)
    cates = np.array([[0.25, 0.75], [0.9, 0.1]], np.float32)
    got = dgvae.decode_logits(jnp.asarray(z), jnp.asarray(items), jnp.log(cates), 0.5)
    want = [math.log(0.25 * math.exp(2.0) + 0.75 * math.exp(-2.0)),
            math.log(0.9 * math.exp(1.0) + 0.1 * math.exp(-1.0))]
    np.testing.assert_allclose(got[0], want, rtol=1e-6)


def test_anneal_schedule():
    cap, total = 0.2, 20000.0
    got = [float(dgvae.anneal(jnp.float32(s), cap, total)) for s in (1, 2000, 3999, 4000, 10**6)]
    np.testing.assert_allclose(got, [1 / 20000, 0.1, 3999 / 20000, 0.2, 0.2], rtol=1e-6)
    assert float(dgvae.anneal(jnp.float32(7), 0.3, 0.0)) == pytest.approx(0.3)  # no annealing


# ----------------------------------------------------------------------------------------------
# Sparse inputs on the device
# ----------------------------------------------------------------------------------------------

def test_cf_encoder_input_matches_the_dense_two_hop_product():
    rng = np.random.default_rng(0)
    image, text = rng.standard_normal((12, 5)), rng.standard_normal((12, 4))
    g = graph.knn_item_graph_scipy([image, text], [0.04, 0.96], 3)  # as DGVAE mixes them
    dense = g.toarray()
    assert not np.allclose(dense, dense.T)  # kNN graphs are not symmetric: the side matters
    x = (rng.random((4, 12)) < 0.3) * rng.integers(1, 3, (4, 12)).astype(np.float32)
    x[2] = 0.0  # a user without training items
    cates = rng.dirichlet(np.ones(3), 12).astype(np.float32)  # (n_items, K)
    # The reference: per factor x_k = l2(x * c_k), then (x_k + x_k G G) / 2 with a dense G.
    xk = x[None] * cates.T[:, None, :]
    xk = xk / np.maximum(np.linalg.norm(xk, axis=-1, keepdims=True), 1e-12)
    want = (xk + xk @ dense @ dense) / 2
    rows = dgvae.rows_of_dense(jnp.asarray(x), 30)
    got = jax.jit(dgvae.cf_encoder_input)(rows, jnp.asarray(cates), dgvae.two_hop_rows(g))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    wrong = dgvae.cf_encoder_input(rows, jnp.asarray(cates), dgvae.two_hop_rows(g.T))
    assert not np.allclose(wrong, want, rtol=1e-3)  # G^T instead of G must not pass


def test_dense_rows_match_scipy():
    m = sp.random(9, 13, density=0.3, random_state=2, format='csr', dtype=np.float32)
    m = sp.csr_matrix(m.toarray() * (np.arange(9) % 3 != 1)[:, None])  # rows 1, 4, 7 empty
    csr = dgvae.csr_rows(m)
    gather = jax.jit(dgvae.gather_rows)
    for rows in ([0, 1, 2, 3, 5, 6], [4, 4, 8, 0, 7, 5], [1, 4, 7, 1, 8, 2]):
        got = gather(csr, jnp.asarray(rows, jnp.int32))
        np.testing.assert_array_equal(got.dense, m.toarray()[rows])
        # The entries are the dense rows' non-zeros; unused slots point past the batch.
        used = np.asarray(got.row) < len(rows)
        rebuilt = np.zeros((len(rows), 13), np.float32)
        rebuilt[np.asarray(got.row)[used], np.asarray(got.col)[used]] = np.asarray(
            got.value)[used]
        np.testing.assert_array_equal(rebuilt, m.toarray()[rows])
        assert (np.asarray(got.value)[~used] == 0).all()
    lengths = np.sort(np.diff(m.indptr))[::-1]
    assert csr.budget(1) == lengths[0] and csr.budget(3) == lengths[:4].sum()
    assert csr.budget(100) == m.nnz


def test_rating_rows_count_repeated_training_rows():
    m = dgvae.rating_matrix(np.array([0, 0, 1, 0]), np.array([2, 1, 0, 2]), 3, 4)
    np.testing.assert_array_equal(m.toarray(), [[0, 1, 2, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


# ----------------------------------------------------------------------------------------------
# The loss on a tiny dataset
# ----------------------------------------------------------------------------------------------

N_USERS, N_ITEMS, N_WORDS, DIM, K = 7, 9, 11, 4, 3
SCALARS = dict(tau=0.1, dropout=0.5, std=0.075, text_std=0.075, lambda_text=0.2,
               lambda_reg=0.4, rating_anneal_cap=0.2, text_anneal_cap=0.2,
               rating_total_anneal_steps=20000.0, text_total_anneal_steps=20000.0,
               item_reg=0.0, prototype_reg=0.0)


@functools.lru_cache(maxsize=None)
def tiny_graph() -> sp.csr_matrix:
    """The tiny dataset's kNN item graph G (9 items, k 3, 0.04 image + 0.96 text)."""
    rng = np.random.default_rng(3)
    return graph.knn_item_graph_scipy([rng.standard_normal((N_ITEMS, 5)),
                                       rng.standard_normal((N_ITEMS, 3))], [0.04, 0.96], 3)


@functools.lru_cache(maxsize=None)
def tiny():
    """(net, params, frozen) of a 7-user, 9-item, 11-word dataset; user 6 has no rows."""
    users = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 0])
    items = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 0])
    words = sp.random(N_USERS, N_WORDS, density=0.4, random_state=4, format='csr',
                      dtype=np.float32)
    words = sp.csr_matrix(words.toarray() * (np.arange(N_USERS) != 6)[:, None])
    frozen = dgvae.Frozen(dgvae.two_hop_rows(tiny_graph()),
                          dgvae.csr_rows(dgvae.rating_matrix(users, items, N_USERS, N_ITEMS)),
                          dgvae.csr_rows(words))
    net = dgvae.DgvaeNet(N_USERS, N_ITEMS, DIM, K)
    return net, dgvae._init_params(jax.random.PRNGKey(0), net, N_WORDS), frozen


@jax.jit
def loss_and_grads(params, frozen, users, weights, noise):
    def batch_loss(p):
        s = {k: jnp.float32(v) for k, v in SCALARS.items()}
        cf_rows = dgvae.gather_rows(frozen.ratings, users)
        x_text = dgvae.dense_rows(frozen.words, users)
        return dgvae.loss_terms(p, cf_rows, x_text, weights, frozen.two_hop, noise, s,
                                jnp.float32(1.0)).total
    return jax.value_and_grad(batch_loss)(params)


def test_padding_rows_do_not_enter_the_loss():
    # The same real rows (3, 1, 6, 5) with different padding rows and noise on them: the loss
    # and its gradients do not change. (The loss equals the torch statement's mean over the
    # real rows alone: tests/test_parity_dgvae.py.)
    net, params, frozen = tiny()
    draw = jax.jit(dgvae.draw_noise, static_argnums=(1, 2, 3))
    noise, other = (draw(jax.random.PRNGKey(i), net, N_WORDS, 5, SCALARS) for i in (1, 2))
    other = jax.tree.map(lambda a, b: a.at[:, 4].set(b[:, 4]) if a.ndim == 3 else a,
                         noise, other)  # only the padding row's draws differ
    weights = jnp.asarray([1, 1, 1, 1, 0], jnp.float32)
    want, g_want = loss_and_grads(params, frozen, jnp.asarray([3, 1, 6, 5, 3]), weights, noise)
    got, g_got = loss_and_grads(params, frozen, jnp.asarray([3, 1, 6, 5, 0]), weights, other)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
                 g_got, g_want)
    # A padding row that counted would change the loss.
    counted = loss_and_grads(params, frozen, jnp.asarray([3, 1, 6, 5, 0]), jnp.ones(5), other)
    assert abs(float(counted[0]) - float(want)) > 1e-3


def test_the_step_counter_is_carried_and_anneals_the_kl():
    # Same batch and noise at every call; a_r = min(1, step / 4) = 0.25, 0.5, 0.75 and the
    # text KL weight 0: the loss grows by 0.25 * KL_cf (> 0) per call only if the counter
    # carried in `carry` advances.
    net, params, frozen = tiny()
    batch = sampling.UserRowBatches(jnp.asarray([0, 2, 4, 6, 1], jnp.int32),
                                    jnp.ones(5, jnp.float32))
    s = {k: jnp.float32(v) for k, v in SCALARS.items()}
    s.update(rating_anneal_cap=jnp.float32(1.0), rating_total_anneal_steps=jnp.float32(4.0),
             text_anneal_cap=jnp.float32(0.0))
    loss = jax.jit(dgvae.loss, static_argnums=0)
    carry = {'update': jnp.int32(0)}
    values = []
    for _ in range(3):
        value, carry = loss(net, params, carry, batch, frozen, None, s, jax.random.PRNGKey(5))
        values.append(float(value))
    assert int(carry['update']) == 3
    first, second = values[1] - values[0], values[2] - values[1]
    assert first > 1e-3
    assert second == pytest.approx(first, rel=1e-3)


# ----------------------------------------------------------------------------------------------
# Config and a short run
# ----------------------------------------------------------------------------------------------

def test_config_checks_name_the_field():
    cfg = dgvae_configs.get_config()
    assert all(ok for ok, _, _ in dgvae.config_checks(cfg, 10, 20))
    for field, value in (('tau', 0.0), ('dropout', 1.0), ('knn_k', 21), ('num_prototypes', 0),
                         ('mm_image_weight', 1.5), ('rating_total_anneal_steps', -1)):
        c = dgvae_configs.get_config()
        c.model[field] = value
        bad = [name for ok, name, _ in dgvae.config_checks(c, 10, 20) if not ok]
        assert bad == [f'model.{field}']
    with pytest.raises(ValueError, match='unknown config variant'):
        dgvae_configs.get_config('nope')


def small_dataset():
    data = synthetic.generate_synthetic(n_users=300, n_items=400, image_dim=24, text_dim=16)
    ds = synthetic.to_dataset(data, 'small')
    view = word_view.build_word_view(list(data.item_text), ds.train.users, ds.train.items,
                                     ds.n_users)
    return ds._replace(extra=model_inputs.as_mapping({'words_file': view.matrix}))


def test_a_short_run_learns():
    """30 epochs through the trainer's own pieces (batches of the 'user_rows' kind, the
    compiled epoch, the carried step counter, evaluation through the model's score), without
    the per-epoch checkpoints of `train.train_and_evaluate`."""
    from lirdrec_jax import grid, parallel
    ds = small_dataset()
    cfg = dgvae_configs.get_config()
    cfg.train.batch_size, cfg.train.seed = 64, (0,)
    cfg.model.embedding_size = 16
    cfg.optim.learning_rate = (3e-3,)  # 150 steps: a larger rate than the reference's 1e-3
    cfg.eval.topk, cfg.eval.metrics = (20,), ('recall',)
    cfg = grid.expand_grid(cfg)[0].config
    data = train.prepare_data(ds, 'dgvae')
    partitioner = parallel.Partitioner(num_devices=1)
    setup = train.setup_point(cfg, data, partitioner)
    fns = train.make_epoch_fns(setup, partitioner, 'last_batch')
    state, host, losses = setup.state, dgvae.MODEL.host_init(cfg.model), []
    for epoch in range(30):
        host, scalars = train.epoch_scalars(dgvae.MODEL, cfg, host, epoch)
        batches = sampling.batch_kind('user_rows').draw(sampling.epoch_rng(0, epoch),
                                                        data.sampler, 64)
        state, step_losses = train.run_epoch(
            fns, state, batches, setup.frozen, None,
            partitioner.replicate(train.device_scalars(scalars)),
            jax.random.fold_in(setup.epoch_key, epoch), None, epoch, partitioner, True)
        losses.append(train.summed_loss(step_losses, epoch))
    assert int(state.carry['update']) == 30 * 5  # ceil(300 / 64) steps per epoch
    assert losses[-1] < 0.9 * losses[0]
    users, items = fns.eval_embeddings(state.params, state.carry, setup.frozen, None,
                                       train.device_scalars(scalars))
    valid, _ = train.evaluate_splits(users, items, data, cfg.eval, partitioner)
    popular = evaluation.evaluate_popularity(ds.train.items, ds.n_items, data.valid,
                                             metrics=('recall',), ks=(20,))
    # Measured (seed 0): valid Recall@20 0.4846 against 0.1927 for most-popular.
    assert valid['recall@20'] > 1.5 * popular['recall@20']


# ----------------------------------------------------------------------------------------------
# model.matmul_dtype = 'bfloat16'
# ----------------------------------------------------------------------------------------------

def small_point(**model):
    """The config of `test_a_short_run_learns` (64 users per batch, d = 16) with `model`."""
    from lirdrec_jax import grid
    cfg = dgvae_configs.get_config()
    cfg.train.batch_size, cfg.train.seed = 64, (0,)
    cfg.model.embedding_size = 16
    cfg.optim.learning_rate = (3e-3,)
    cfg.eval.topk, cfg.eval.metrics, cfg.eval.valid_metric = (20,), ('recall',), 'recall@20'
    for k, v in model.items():
        cfg.model[k] = v
    return grid.expand_grid(cfg)[0].config


@pytest.fixture(scope='module')
def trainer_data():
    return train.prepare_data(small_dataset(), 'dgvae')


def test_bfloat16_runs_both_encoders_in_bfloat16(trainer_data):
    """'float32' is the program without the field, bit for bit; 'bfloat16' runs both encoders'
    (K B, n) x (n, 2d) products with bfloat16 operands and float32 results: forward, kernel
    gradient and input gradient (the inputs x_k depend on the trainable factor assignments)."""
    from tests.mixed_precision import (assert_close_not_equal, bfloat16_dots,
                                       first_steps_by_dtype, tensor)
    runs = first_steps_by_dtype(small_point, trainer_data)

    rows, h = 3 * 64, 2 * 16  # K factors x B users; the encoder's width 2d
    n_items = trainer_data.dataset.n_items
    n_words = trainer_data.dataset.extra['words_file'].shape[1]
    want = []
    for n in (n_items, n_words):
        want += [(tensor(rows, n, 'bf16'), tensor(n, h, 'bf16'), tensor(rows, h, 'f32')),
                 (tensor(rows, n, 'bf16'), tensor(rows, h, 'bf16'), tensor(n, h, 'f32')),
                 (tensor(rows, h, 'bf16'), tensor(h, n, 'bf16'), tensor(rows, n, 'f32'))]
    assert bfloat16_dots(runs['bfloat16'][0]) == sorted(want)
    # Measured: 1.0e-2 norm-wise, at most 1.9e-2 on a leaf (the text view's embeddings).
    assert_close_not_equal(runs['float32'][1:], runs['bfloat16'][1:])


def test_bfloat16_keeps_the_inputs_and_parameters_float32(trainer_data):
    """The user matrices and the two-hop graph are the same float32 arrays either way, and so
    are the parameters: only the encoders' operands are rounded, in the step."""
    from lirdrec_jax import parallel
    one = parallel.Partitioner(num_devices=1)
    f32, bf16 = (train.setup_point(small_point(matmul_dtype=d), trainer_data, one)
                 for d in ('float32', 'bfloat16'))
    assert (f32.net.matmul_dtype, bf16.net.matmul_dtype) == ('float32', 'bfloat16')
    for a, b in zip(jax.tree.leaves(f32.frozen), jax.tree.leaves(bf16.frozen)):
        assert a.dtype == b.dtype and a.dtype in (jnp.float32, jnp.int32)
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(f32.state.params), jax.tree.leaves(bf16.state.params)):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)


def test_bfloat16_training_stays_close(trainer_data, tmp_path):
    from tests.mixed_precision import assert_training_close
    assert_training_close(lambda dtype: small_point(matmul_dtype=dtype), trainer_data, tmp_path)


def test_config_checks_name_matmul_dtype():
    from tests.mixed_precision import assert_matmul_dtype_checks
    assert_matmul_dtype_checks(dgvae.config_checks, dgvae_configs.get_config(), 10, 20)
