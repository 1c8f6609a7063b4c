"""LIRDRec forward pass, initialisation, PWC schedule and train step against independent
numpy restatements written from the paper and the reference's semantics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lirdrec_jax import graph, losses, optim, sampling, train
from lirdrec_jax.models import lirdrec

N_USERS, N_ITEMS, DIM = 12, 9, 8


@pytest.fixture(scope='module')
def setup():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(N_USERS), 3)
    items = rng.integers(0, N_ITEMS, users.size)
    image = rng.random((N_ITEMS, 10)).astype(np.float32)
    text = rng.standard_normal((N_ITEMS, 6)).astype(np.float32)
    features = lirdrec.item_features(image, text)
    graphs = lirdrec.Graphs(graph.norm_adjacency(users, items, N_USERS, N_ITEMS),
                            graph.knn_item_graph([image, text], [0.3, 0.7], 3))
    model = lirdrec.LIRDRec(N_USERS, N_ITEMS, DIM, n_ui_layers=2, n_mm_layers=1)
    params = model.init(jax.random.PRNGKey(0), features, graphs, 1.0, 0.0)['params']
    return dict(users=users, items=items, image=image, text=text, features=features,
                graphs=graphs, model=model, params=params)


def np_leaky(x):
    return np.where(x > 0, x, 0.01 * x)


def np_tower(p, x):
    return np_leaky(x @ p['hidden']['kernel'] + p['hidden']['bias']) @ p['out']['kernel']


def np_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def np_forward(params, image, text, adj, item_adj, w1, w2, n_layers, n_mm_layers):
    """The model written out with dense numpy matrices in float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    n = image.shape[1]
    dct_image = np.array([[np.sqrt((1 if k == 0 else 2) / n) * np.cos(np.pi * k * (2 * j + 1) / (2 * n))
                           for j in range(n)] for k in range(n)]) @ image.T.astype(np.float64)
    n = text.shape[1]
    dct_text = np.array([[np.sqrt((1 if k == 0 else 2) / n) * np.cos(np.pi * k * (2 * j + 1) / (2 * n))
                          for j in range(n)] for k in range(n)]) @ text.T.astype(np.float64)
    spectral = np.concatenate([dct_image.T, dct_text.T], axis=1)
    blocks = []
    for name, x in (('image', image), ('text', text), ('spectral', spectral)):
        rep = np.concatenate([p[f'{name}_preference'], np_tower(p[f'{name}_tower'], x)], 0)
        blocks.append(np_normalize(rep))
    ego = np.concatenate(blocks, 1)
    total = ego.copy()
    for _ in range(n_layers):
        ego = adj @ ego
        total += ego
    users, items = total[:N_USERS], total[N_USERS:]
    views = [users[:, i * DIM:(i + 1) * DIM] for i in range(3)]
    f = p['fusion']
    scores = np.concatenate([
        np_leaky(v @ f[w]['fc1']['kernel'] + f[w]['fc1']['bias']) @ f[w]['fc2']['kernel']
        + f[w]['fc2']['bias'] for w, v in zip(('weco_a', 'weco_b', 'weco_c'), views)], 1)
    logits = w1 * scores + w2 * f['theta']
    att = np.exp(logits - logits.max(1, keepdims=True))
    att /= att.sum(1, keepdims=True)
    fused = np.concatenate([att[:, i:i + 1] * views[i] for i in range(3)], 1)
    h = items
    for _ in range(n_mm_layers):
        h = item_adj @ h
    return fused, items + h, att


def test_forward_matches_numpy_restatement(setup):
    s = setup
    w1, w2 = 0.7, 0.3
    users, items, att = s['model'].apply({'params': s['params']}, s['features'], s['graphs'], w1, w2)
    ref_u, ref_i, ref_a = np_forward(s['params'], s['image'], s['text'],
                                     np.asarray(s['graphs'].user_item.todense(), np.float64),
                                     np.asarray(s['graphs'].item_item.todense(), np.float64),
                                     w1, w2, 2, 1)
    assert users.shape == (N_USERS, 3 * DIM) and items.shape == (N_ITEMS, 3 * DIM)
    np.testing.assert_allclose(np.asarray(users), ref_u, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(items), ref_i, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(att), ref_a, rtol=2e-5, atol=2e-6)


def test_forward_fails_with_one_layer_fewer(setup):
    """The comparison above can fail: the restatement with one layer fewer differs."""
    s = setup
    users, _, _ = s['model'].apply({'params': s['params']}, s['features'], s['graphs'], 0.7, 0.3)
    ref_u, _, _ = np_forward(s['params'], s['image'], s['text'],
                             np.asarray(s['graphs'].user_item.todense(), np.float64),
                             np.asarray(s['graphs'].item_item.todense(), np.float64), 0.7, 0.3, 1, 1)
    assert np.abs(np.asarray(users) - ref_u).max() > 1e-3


def test_initialisation_matches_pytorch_distributions():
    n_users = 4000
    model = lirdrec.LIRDRec(n_users, 50, 64)
    rng = np.random.default_rng(1)
    feats = lirdrec.item_features(rng.random((50, 300)).astype(np.float32),
                                  rng.random((50, 20)).astype(np.float32))
    users, items = np.arange(n_users) % n_users, np.arange(n_users) % 50
    graphs = lirdrec.Graphs(graph.norm_adjacency(users, items, n_users, 50),
                            graph.knn_item_graph([feats.image, feats.text], [0.1, 0.9], 5))
    p = model.init(jax.random.PRNGKey(3), feats, graphs, 1.0, 0.0)['params']
    # xavier_normal_: std = sqrt(2 / (fan_in + fan_out)), a plain (untruncated) normal.
    pref = np.asarray(p['image_preference'])
    assert pref.std() == pytest.approx(np.sqrt(2 / (64 + n_users)), rel=0.02)
    assert np.abs(pref).max() > 3 * pref.std()  # not truncated at 2 std
    theta = np.asarray(p['fusion']['theta'])
    assert theta.std() == pytest.approx(np.sqrt(2 / (3 + n_users)), rel=0.03)
    # nn.Linear: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    kernel = np.asarray(p['image_tower']['hidden']['kernel'])
    assert kernel.shape == (300, 256)
    bound = 1 / np.sqrt(300)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.98 * bound
    assert kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.02)
    bias = np.asarray(p['image_tower']['hidden']['bias'])
    assert np.abs(bias).max() <= bound
    assert 'bias' not in p['image_tower']['out']


def test_pwc_schedule_compounds_as_worked_out_by_hand():
    # epoch 1: w1 = 0.9*0.9 = 0.81, w2 = 0.1 -> (0.81/0.91, 0.1/0.91)
    w1, w2 = lirdrec.pwc_weights_for_epoch(0.9, 0.1, 1, 0.9)
    assert (w1, w2) == pytest.approx((0.81 / 0.91, 0.1 / 0.91))
    # epoch 2 starts from epoch 1's weights: w1 * 0.81, then renormalised.
    w1b, w2b = lirdrec.pwc_weights_for_epoch(w1, w2, 2, 0.9)
    a = (0.81 / 0.91) * 0.81
    assert (w1b, w2b) == pytest.approx((a / (a + 0.1 / 0.91), (0.1 / 0.91) / (a + 0.1 / 0.91)))


def test_bpr_loss_worked_out_on_paper():
    # Three users; margins 2-0 = 2, 0-1 = -1, 1-1 = 0; third row is padding (weight 0).
    u = jnp.array([[1., 0.], [0., 1.], [1., 1.]])
    p = jnp.array([[2., 5.], [3., 0.], [0., 1.]])
    n = jnp.array([[0., 9.], [0., 1.], [1., 0.]])
    w = jnp.array([1., 1., 0.])
    expected = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(1.0))) / 2
    assert float(losses.bpr_loss(u, p, n, w)) == pytest.approx(expected, rel=1e-6)
    # L2 term: mean of squares over the full matrices.
    assert float(losses.embedding_l2(u, p)) == pytest.approx(4 / 6 + (4 + 25 + 9 + 1) / 6)


def test_train_step_returns_pre_update_embeddings_and_adam_update(setup):
    s = setup
    model, optimizer = s['model'], optim.create_optimizer()
    frozen = lirdrec.Frozen(s['features'], *s['graphs'])
    params, carry = lirdrec.init(jax.random.PRNGKey(0), model, frozen, frozen)
    state = train.TrainState(params, optimizer.init(params), carry)
    params_before = jax.tree.map(np.asarray, state.params)
    batch = sampling.EpochBatches(jnp.array([0, 1, 2, 0]), jnp.array([1, 2, 3, 1]),
                                  jnp.array([4, 5, 6, 4]), jnp.array([1., 1., 1., 0.]))
    lr, reg = 0.01, 0.1
    scalars = train.device_scalars({'w1': 0.6, 'w2': 0.4, 'learning_rate': lr,
                                    'reg_weight': reg})

    def loss_of(params):
        u, i, _ = model.apply({'params': params}, s['features'], s['graphs'], 0.6, 0.4)
        return (losses.bpr_loss(u[batch.users], i[batch.positives], i[batch.negatives],
                                batch.weights) + reg * losses.embedding_l2(u, i))

    grads = jax.grad(loss_of)(params_before)
    u0, i0, a0 = model.apply({'params': params_before}, s['features'], s['graphs'], 0.6, 0.4)
    step = jax.jit(train.train_step_fn(lirdrec.MODEL, model, optimizer), donate_argnums=0)
    new_state, loss = step(state, batch, frozen, None, scalars, jax.random.PRNGKey(0),
                           jnp.int32(0))
    assert float(loss) == pytest.approx(float(loss_of(params_before)), rel=1e-6)
    # Evaluation quirk: the state carries the forward computed BEFORE the optimiser step.
    np.testing.assert_allclose(np.asarray(new_state.carry.user_emb), np.asarray(u0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(new_state.carry.attention), np.asarray(a0), rtol=1e-5, atol=1e-7)
    # First Adam step: m = (1-b1) g, v = (1-b2) g^2, bias-corrected -> update = g / (|g| + eps').
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g, np.float64)
        before = np.asarray(_get(params_before, path), np.float64)
        after = np.asarray(_get(new_state.params, path), np.float64)
        expected = before - lr * g / (np.abs(g) + 1e-8)
        np.testing.assert_allclose(after, expected, rtol=1e-4, atol=1e-6)


def _get(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_with_theta_replaces_only_theta(setup):
    p = setup['params']
    new = lirdrec.with_theta(p, jnp.ones((N_USERS, 3)))
    assert np.all(np.asarray(new['fusion']['theta']) == 1)
    assert new['fusion']['weco_a'] is p['fusion']['weco_a']
    assert not np.all(np.asarray(p['fusion']['theta']) == 1)  # the input is untouched


def test_item_features_require_both_modalities():
    with pytest.raises(ValueError, match='text_feat.npy'):
        lirdrec.item_features(np.ones((3, 2)), None)
