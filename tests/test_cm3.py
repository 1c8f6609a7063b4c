"""CM3 (lirdrec_jax/models/cm3.py): the slerp and its parallel-case guard, the loss's pair terms
worked out by hand and against the explicit torch statement (tests/torch_cm3.py), padding rows,
the Beta draws, the interface's state, the configs, and a short training run."""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from configs import cm3 as cm3_configs  # noqa: E402
from lirdrec_jax import evaluation, grid, sweep, train  # noqa: E402
from lirdrec_jax.data import Interactions, MMRecDataset  # noqa: E402
from lirdrec_jax.models import base, cm3  # noqa: E402
from tests import torch_cm3 as T  # noqa: E402
from tests.mixed_precision import (assert_close_not_equal, assert_training_close,  # noqa: E402
                                   assert_matmul_dtype_checks, bfloat16_dots,
                                   first_steps_by_dtype, tensor)


class Batch(NamedTuple):
    users: jax.Array
    positives: jax.Array
    negatives: jax.Array
    weights: jax.Array


def unit_rows(x):
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# Compiled once each: run eagerly, every small operation would compile on its own.
slerp = jax.jit(cm3.slerp)
uniformity = jax.jit(cm3.uniformity)
calibrated_uniformity = jax.jit(cm3.calibrated_uniformity)
alignment = jax.jit(cm3.alignment)
pair_mask = jax.jit(cm3.pair_mask)
squared_distances = jax.jit(cm3.squared_distances)
cm3_loss = jax.jit(cm3.cm3_loss)
cm3_loss_grads = jax.jit(jax.grad(cm3.cm3_loss, argnums=(0, 1, 2, 3)))
forward = jax.jit(cm3.forward, static_argnums=0)


# ----------------------------------------------------------------------------------------------
# The slerp
# ----------------------------------------------------------------------------------------------

def test_slerp_of_orthogonal_vectors_by_hand():
    # At a right angle sin(th) = 1: the weights are sin(lam pi/2) (text), cos(lam pi/2) (image).
    lam = np.array([0.0, 0.25, 0.5, 1.0], np.float32)
    e1 = np.tile([[1.0, 0.0, 0.0]], (4, 1)).astype(np.float32)
    e2 = np.tile([[0.0, 1.0, 0.0]], (4, 1)).astype(np.float32)
    mix = np.asarray(slerp(e1, e2, lam))
    expected = np.stack([np.sin(lam * np.pi / 2), np.cos(lam * np.pi / 2), 0 * lam], 1)
    np.testing.assert_allclose(mix, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(mix, axis=1), 1.0, rtol=1e-6)
    # The same against the torch statement at a general angle.
    rng = np.random.default_rng(0)
    a, b = unit_rows(rng.standard_normal((5, 4))), unit_rows(rng.standard_normal((5, 4)))
    lam = rng.random(5).astype(np.float32)
    ref = T.slerp(torch.tensor(a), torch.tensor(b), torch.tensor(lam)).numpy()
    np.testing.assert_allclose(np.asarray(slerp(a, b, lam)), ref, atol=1e-6)


def slerp_loss(p_text, p_image, lam, w):
    return jnp.sum(w * slerp(p_text, p_image, lam))


slerp_grad = jax.jit(jax.grad(slerp_loss, argnums=(0, 1)))


def test_parallel_projections_take_the_limit_instead_of_nan():
    """The reference's formula is 0/0 = NaN at parallel rows (its clamp to 1 - 1e-8 is 1 in
    float32); ours takes the limit, value and gradient."""
    e = np.array([[0.6, 0.8, 0.0]], np.float32)  # cos(e, e) = 0.36 + 0.64 = 1 exactly
    w = np.array([[0.3, -1.0, 2.0]], np.float32)
    for lam in (0.1, 0.5, 0.9):
        lam_ = np.array([lam], np.float32)
        np.testing.assert_allclose(np.asarray(slerp(e, e, lam_)), e, atol=1e-7)
        # The reference's formula (the torch statement has no guard): NaN.
        assert torch.isnan(T.slerp(torch.tensor(e), torch.tensor(e), torch.tensor(lam_))).all()
        # Gradient: mix = a(c) p_t + b(c) p_v with c = p_t . p_v, a -> lam, b -> 1 - lam and
        # a'(1) = -lam (1 - lam^2) / 3, b'(1) = -(1 - lam) (1 - (1 - lam)^2) / 3, so at
        # p_t = p_v = e: d/dp_t = lam w + (w.e)(a' + b') e, d/dp_v = (1 - lam) w + (w.e)(a' + b') e.
        da = -lam * (1 - lam ** 2) / 3
        db = -(1 - lam) * (1 - (1 - lam) ** 2) / 3
        g_text, g_image = (np.asarray(g) for g in slerp_grad(e, e, lam_, w))
        we = float((w @ e.T)[0, 0])
        np.testing.assert_allclose(g_text, lam * w + we * (da + db) * e, atol=1e-6)
        np.testing.assert_allclose(g_image, (1 - lam) * w + we * (da + db) * e, atol=1e-6)
    # Continuity: at the smallest positive float32 angle (cos = 1 - 2^-24) the formula runs,
    # and it agrees with the limit to float32 rounding.
    theta = np.arccos(np.float32(1 - 2.0 ** -24))
    tilted = np.array([[np.cos(theta), np.sin(theta), 0.0]], np.float32)
    base_ = np.array([[1.0, 0.0, 0.0]], np.float32)
    assert float((base_ @ tilted.T)[0, 0]) < 1.0
    lam = np.array([0.3], np.float32)
    near = np.asarray(slerp(tilted, base_, lam))
    np.testing.assert_allclose(near, 0.3 * tilted + 0.7 * base_, atol=1e-6)


def test_torch_clamp_passes_the_gradient_at_the_bounds():
    x = jnp.array([-0.5, 0.0, 0.4, 0.8, 1.0])
    np.testing.assert_allclose(np.asarray(cm3.torch_clamp(x, 0.0, 0.8)), [0, 0, 0.4, 0.8, 0.8])
    g = jax.grad(lambda v: jnp.sum(cm3.torch_clamp(v, 0.0, 0.8)))(x)
    np.testing.assert_array_equal(np.asarray(g), [0, 1, 1, 1, 0])  # torch.clamp's, bounds in
    assert float(jax.grad(lambda v: jnp.clip(v, 0.0, 0.8))(0.8)) == 0.5  # why not jnp.clip


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------

def test_pair_terms_worked_out_by_hand():
    # Users u0, u1 and u1 again (a repeated user is a pair at distance 0, counted), then one
    # padding row that must not count.
    u0, u1 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    users = np.stack([u0, u1, u1, [5.0, 5.0]]).astype(np.float32)
    weights = np.array([1, 1, 1, 0], np.float32)
    mask = pair_mask(weights)
    np.testing.assert_array_equal(np.asarray(mask), [[0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0],
                                                     [0, 0, 0, 0]])
    # ||u0 - u1||^2 = 2 for two pairs, 0 for (u1, u1): log((2 e^-4 + 1) / 3).
    expected = np.log((2 * np.exp(-4.0) + 1.0) / 3.0)
    assert float(uniformity(users, mask)) == pytest.approx(expected, rel=1e-6)
    # Calibrated: exp(-2 (d^2 - 2 + 2 s)) with s = (0.3, 0.9 -> clamped 0.8 by the caller, 0).
    sim = np.array([[0, 0.3, 0.8, 0], [0, 0, 0.0, 0], [0] * 4, [0] * 4], np.float32)
    expected = np.log((np.exp(-2 * (2 - 2 + 0.6)) + np.exp(-2 * (2 - 2 + 1.6))
                       + np.exp(-2 * (0 - 2 + 0))) / 3.0)
    assert float(calibrated_uniformity(users, sim, mask)) == pytest.approx(expected, rel=1e-6)
    # Alignment: mean over real rows of ||u - p||^2.
    positives = np.stack([u1, u1, u0, u0]).astype(np.float32)
    assert float(alignment(users, positives, weights)) == pytest.approx((2 + 0 + 2) / 3)
    # Gram distances equal explicit differences.
    x = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)
    explicit = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.testing.assert_allclose(np.asarray(squared_distances(x)), explicit, atol=1e-5)
    # Fewer than two real rows: no pair, the term is 0 (the reference: NaN).
    assert float(uniformity(users, pair_mask(np.array([1, 0, 0, 0], np.float32)))) == 0


def batch_inputs(seed, n_real, n_pad, dim=6, mix_dim=4):
    """Normalised rows with repeated users and negatives, `n_pad` padding rows (garbage)."""
    rng = np.random.default_rng(seed)
    n = n_real + n_pad
    users = unit_rows(rng.standard_normal((n, dim)))
    users[3] = users[1]  # a repeated user
    positives = unit_rows(rng.standard_normal((n, dim)))
    negatives = unit_rows(rng.standard_normal((n, dim)))
    negatives[4] = negatives[0]  # a repeated negative
    mix = rng.standard_normal((n, mix_dim)).astype(np.float32)
    mix[4] = mix[0]
    weights = np.r_[np.ones(n_real), np.zeros(n_pad)].astype(np.float32)
    return users, positives, negatives, mix, weights


def torch_reference_loss(users, positives, negatives, mix, gamma, lo, hi):
    """The statement of tests/torch_cm3.py on real rows only (explicit pairs, no masks)."""
    u, p, n, m = (torch.tensor(a, dtype=torch.float64) for a in (users, positives, negatives, mix))
    align = ((u - p) ** 2).sum(1).mean()
    uniform = T.uniformity(u) + T.calibrated_uniformity(n, T.pair_similarities(m, lo, hi))
    return float(align + gamma * uniform / 2)


def test_loss_matches_the_explicit_statement_and_padding_enters_no_mean():
    users, positives, negatives, mix, weights = batch_inputs(0, n_real=9, n_pad=3)
    gamma, lo, hi = 0.9, 0.0, 0.8
    real = slice(0, 9)
    expected = torch_reference_loss(users[real], positives[real], negatives[real], mix[real],
                                    gamma, lo, hi)
    padded = float(cm3_loss(users, positives, negatives, mix, weights, gamma, lo, hi))
    trimmed = float(cm3_loss(users[real], positives[real], negatives[real], mix[real],
                                 weights[real], gamma, lo, hi))
    assert padded == pytest.approx(expected, rel=1e-5)
    assert trimmed == pytest.approx(expected, rel=1e-5)
    # Padding rows get no gradient.
    grads = cm3_loss_grads(users, positives, negatives, mix, weights, gamma, lo, hi)
    for g in grads:
        assert np.all(np.asarray(g)[9:] == 0) and np.abs(np.asarray(g)[:9]).max() > 0
    # Must fail: counting the padding rows, or the distinct users only, changes the value.
    counted = float(cm3_loss(users, positives, negatives, mix, np.ones(12, np.float32),
                                 gamma, lo, hi))
    assert abs(counted - expected) > 1e-3
    distinct = np.r_[0:3, 4:9]  # user row 3 repeats row 1
    u, p, n, m = (torch.tensor(a[:9], dtype=torch.float64)
                  for a in (users, positives, negatives, mix))
    unique_users = float(((u - p) ** 2).sum(1).mean() + gamma / 2 * (
        T.uniformity(u[distinct]) + T.calibrated_uniformity(n, T.pair_similarities(m, lo, hi))))
    assert abs(unique_users - expected) > 1e-3


def test_gradient_flows_through_the_similarities():
    users, positives, negatives, mix, weights = batch_inputs(2, n_real=8, n_pad=0)
    g_mix = cm3_loss_grads(users, positives, negatives, mix, weights, 0.5, 0.0, 1.0)[3]
    m = torch.tensor(mix, dtype=torch.float64, requires_grad=True)
    n = torch.tensor(negatives, dtype=torch.float64)
    (0.5 / 2 * T.calibrated_uniformity(n, T.pair_similarities(m, 0.0, 1.0))).backward()
    np.testing.assert_allclose(np.asarray(g_mix), m.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert np.abs(m.grad.numpy()).max() > 1e-3


# ----------------------------------------------------------------------------------------------
# The Beta draws
# ----------------------------------------------------------------------------------------------

draw = jax.jit(cm3.draw_mix_weights, static_argnums=2)


def test_beta_draws_have_the_beta_moments():
    n = 100_000
    for alpha in (0.1, 0.5, 0.9):
        lam = np.asarray(draw(jax.random.PRNGKey(0), jnp.float32(alpha), n), np.float64)
        assert lam.shape == (n,) and np.isfinite(lam).all()
        assert lam.min() >= 0 and lam.max() <= 1
        # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); standard errors below 1.5e-3.
        assert lam.mean() == pytest.approx(0.5, abs=5e-3)
        assert lam.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), abs=5e-3)
    a, b = (np.asarray(draw(jax.random.PRNGKey(k), jnp.float32(0.5), 10)) for k in (1, 2))
    assert not np.array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# The model on its interface
# ----------------------------------------------------------------------------------------------

N_USERS, N_ITEMS, DIM = 8, 9, 4
TRAIN = np.array([(u, (u * 2 + k) % N_ITEMS) for u in range(N_USERS) for k in range(3)])


def tiny_dataset(image=True, text=True) -> MMRecDataset:
    rng = np.random.default_rng(0)
    empty = Interactions(np.zeros(0, np.int32), np.zeros(0, np.int32))
    train_ = Interactions(TRAIN[:, 0].astype(np.int32), TRAIN[:, 1].astype(np.int32))
    return MMRecDataset('tiny', N_USERS, N_ITEMS, train_, empty, empty,
                        rng.standard_normal((N_ITEMS, 10)).astype(np.float32) if image else None,
                        rng.standard_normal((N_ITEMS, 7)).astype(np.float32) if text else None)


def model_config(**overrides) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict(dict(embedding_size=DIM, knn_k=3, mm_image_weight=0.1,
                                       n_mm_layers=1, n_ui_layers=2, gamma=0.5, min_sim=0.0,
                                       max_sim=0.8, alpha=0.5))
    m.update(overrides)
    return m


@pytest.fixture(scope='module')
def setup():
    ds = tiny_dataset()
    cfg = model_config()
    prepared = cm3.prepare(ds)
    frozen = cm3.frozen_inputs(prepared, ds, cfg)
    net = cm3.create(cfg, N_USERS, N_ITEMS)
    params, carry = cm3.init(jax.random.PRNGKey(0), net, frozen, frozen)
    batch = Batch(jnp.array([0, 3, 3, 5, 0]), jnp.array([0, 6, 7, 3, 0]),
                  jnp.array([8, 1, 1, 4, 8]), jnp.array([1.0, 1, 1, 1, 0]))
    _, scalars = cm3.epoch_schedule(cfg, {}, 0)
    return dict(ds=ds, cfg=cfg, frozen=frozen, net=net, params=params, carry=carry, batch=batch,
                scalars=scalars)


@functools.partial(jax.jit, static_argnums=0)
def loss_outputs(net, params, batch, frozen, scalars, rng, lam):
    """The interface's loss with lambdas drawn from `rng` (and those lambdas), and the loss
    with the given lambdas `lam` with its gradients: one compiled program for the tests."""
    drawn = cm3.draw_mix_weights(rng, scalars['alpha'], net.n_items)
    from_key = cm3.MODEL.loss(net, params, None, batch, frozen, None, scalars, rng)
    given = jax.value_and_grad(
        lambda p: cm3.loss_with_mix_weights(net, p, batch, frozen, scalars, lam),
        has_aux=True)(params)
    return from_key, drawn, given


def test_loss_draws_fresh_lambdas_from_its_key_and_carries_the_unnormalised_forward(setup):
    s = setup
    args = (s['net'], s['params'], s['batch'], s['frozen'], s['scalars'])
    (value, carry), lam, _ = loss_outputs(*args, jax.random.PRNGKey(5), jnp.zeros(N_ITEMS))
    _, _, ((again, _), _) = loss_outputs(*args, jax.random.PRNGKey(5), lam)
    assert float(value) == pytest.approx(float(again), rel=1e-6)
    (other, _), other_lam, _ = loss_outputs(*args, jax.random.PRNGKey(6), lam)
    assert float(other) != float(value)  # another key, other lambdas
    assert not np.array_equal(np.asarray(other_lam), np.asarray(lam))
    users, items, mix = forward(s['net'], s['params'], s['frozen'], lam)
    np.testing.assert_allclose(np.asarray(carry.user_emb), np.asarray(users), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(np.asarray(carry.item_emb), np.asarray(items), rtol=1e-5,
                               atol=1e-7)
    assert carry.user_emb.shape == (N_USERS, 3 * DIM) and mix.shape == (N_ITEMS, DIM)
    # Not normalised (the reference evaluates on result_embed as it is).
    assert np.abs(np.linalg.norm(np.asarray(users), axis=1) - 1).max() > 0.01
    # Evaluation: the carry, or a fresh forward at lambda = 1/2.
    u, i = cm3.eval_embeddings(s['net'], s['params'], carry, s['frozen'], None, {}, 'last_batch')
    assert u is carry.user_emb and i is carry.item_emb
    fresh = jax.jit(cm3.eval_embeddings, static_argnums=(0, 6))
    u, i = fresh(s['net'], s['params'], carry, s['frozen'], None, {}, 'fresh')
    half, _, _ = forward(s['net'], s['params'], s['frozen'], jnp.full((N_ITEMS,), 0.5))
    np.testing.assert_allclose(np.asarray(u), np.asarray(half), rtol=1e-5, atol=1e-7)


def test_forward_by_hand_on_the_tiny_graph(setup):
    """The propagation and fusion written out with dense numpy matrices in float64."""
    s = setup
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), s['params'])
    lam = np.linspace(0.1, 0.9, N_ITEMS).astype(np.float32)
    users, items, mix = (np.asarray(a, np.float64) for a in
                         forward(s['net'], s['params'], s['frozen'], lam))
    leaky = lambda x: np.where(x > 0, x, 0.01 * x)
    tower = lambda t, x: leaky(x @ t['hidden']['kernel'] + t['hidden']['bias']) @ t['out']['kernel']
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    ds = s['ds']
    p_t = norm(ds.text_feat @ p['text_projection']['kernel'] + p['text_projection']['bias'])
    p_v = norm(ds.image_feat @ p['image_projection']['kernel'] + p['image_projection']['bias'])
    th = np.arccos(np.sum(p_t * p_v, 1))
    mix64 = (np.sin(lam * th) / np.sin(th))[:, None] * p_t \
        + (np.sin((1 - lam) * th) / np.sin(th))[:, None] * p_v
    np.testing.assert_allclose(mix, mix64, atol=1e-5)
    x = np.concatenate([norm(np.concatenate([p['image_preference'], tower(p['image_tower'], ds.image_feat)])),
                        norm(np.concatenate([p['text_preference'], tower(p['text_tower'], ds.text_feat)])),
                        norm(np.concatenate([p['mix_preference'], mix64]))], 1)
    adj = np.asarray(s['frozen'].user_item.todense(), np.float64)
    total = x + adj @ x + adj @ adj @ x  # two layers, summed
    att = np.exp(p['theta'][:, :, 0])
    att /= att.sum(1, keepdims=True)
    u = total[:N_USERS]
    fused = np.concatenate([att[:, k:k + 1] * u[:, k * DIM:(k + 1) * DIM] for k in range(3)], 1)
    knn = np.asarray(s['frozen'].item_item.todense(), np.float64)
    np.testing.assert_allclose(users, fused, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(items, total[N_USERS:] + knn @ total[N_USERS:], rtol=1e-4, atol=1e-6)
    # Must fail: the mean over layers instead of the sum.
    assert np.abs(users - fused / 3).max() > 1e-2


def test_parallel_projections_keep_the_loss_finite(setup):
    """Both projections sending every item to the same direction (zero kernels, the same bias
    e = (0.6, 0.8, 0, 0)): the reference's slerp is NaN there, the loss and every gradient
    here stay finite and the mix is e."""
    s = setup
    params = jax.tree.map(lambda a: a, s['params'])
    bias = jnp.array([0.6, 0.8, 0.0, 0.0], jnp.float32)
    for name in ('text_projection', 'image_projection'):
        params[name] = {'kernel': jnp.zeros_like(params[name]['kernel']), 'bias': bias}
    lam = jnp.full((N_ITEMS,), 0.3, jnp.float32)
    _, _, mix = forward(s['net'], params, s['frozen'], lam)
    np.testing.assert_allclose(np.asarray(mix), np.tile(bias, (N_ITEMS, 1)), atol=1e-6)
    _, _, ((value, _), grads) = loss_outputs(s['net'], params, s['batch'], s['frozen'],
                                             s['scalars'], jax.random.PRNGKey(0), lam)
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_prepare_needs_both_feature_files():
    with pytest.raises(ValueError, match='data.text_file'):
        cm3.prepare(tiny_dataset(text=False))
    with pytest.raises(ValueError, match='data.image_file'):
        cm3.prepare(tiny_dataset(image=False))


def test_knn_graph_is_the_cores_binary_row_normalised_graph(setup):
    """The reference's CM3 graph: top-k cosine neighbours per modality, self included, binary,
    every value 1/(k + 1e-7), mixed 0.1 image + 0.9 text."""
    s = setup
    knn = np.asarray(s['frozen'].item_item.todense(), np.float64)
    ds = s['ds']
    expected = np.zeros((N_ITEMS, N_ITEMS))
    for w, f in ((0.1, ds.image_feat), (0.9, ds.text_feat)):
        x = f / np.linalg.norm(f, axis=1, keepdims=True)
        top = np.argsort(-(x @ x.T), axis=1, kind='stable')[:, :3]
        for row, cols in enumerate(top):
            expected[row, cols] += w / (3 + 1e-7)
    np.testing.assert_allclose(knn, expected, rtol=1e-6, atol=1e-8)
    assert np.all(np.diag(knn) > 0)  # self included


def test_flops_count_by_hand():
    cfg = model_config(embedding_size=8, n_ui_layers=3, n_mm_layers=1, knn_k=10)
    size = base.ProblemSize(100, 50, n_train=400, batch_size=16, feature_dims=(20, 12))
    towers = 2 * 50 * sum(2 * (f * 32 + 32 * 8 + f * 8) for f in (20, 12))
    propagation = 4 * 24 * (3 * 800 + 50 * 10)
    grams = 6 * 16 ** 2 * (2 * 24 + 8)
    assert cm3.flops_per_batch(cfg, size) == towers + propagation + grams


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

def point_model(cfg) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({k: v[0] if isinstance(v, tuple) else v
                                      for k, v in cfg.model.to_dict().items()})


@pytest.mark.parametrize('variant', ['synthetic', *cm3_configs.MMREC_DATASETS])
def test_config_variants_pass_the_checks(variant):
    cfg = cm3_configs.get_config(variant)
    assert cfg.model_name == 'cm3' and cfg.train.stopping_step == 10
    assert cfg.optim.learning_rate == (0.001,) and 'weight_decay' not in cfg.model
    whole = ml_collections.ConfigDict({'model': point_model(cfg), 'eval': cfg.eval.to_dict()})
    assert [f for ok, f, _ in cm3.config_checks(whole, 100, 50) if not ok] == []
    points = grid.expand_grid(cfg)
    if variant == 'synthetic':
        assert len(points) == 1
    else:
        assert len(points) == 24
        assert cfg.hyper_parameters[-1] == 'train.seed'
        assert {(p.config.model.n_ui_layers, p.config.model.alpha) for p in points} == {
            (n, a) for n in (3, 4) for a in (0.1, 0.5, 0.9)}


@pytest.mark.parametrize('field,value', [
    ('knn_k', 0), ('mm_image_weight', 1.5), ('n_ui_layers', -1), ('gamma', -0.1),
    ('alpha', 0.0), ('min_sim', -2.0), ('max_sim', 1.5), ('embedding_size', 0)])
def test_config_checks_name_the_bad_field(field, value):
    m = point_model(cm3_configs.get_config('baby'))
    m[field] = value
    whole = ml_collections.ConfigDict({'model': m, 'eval': {'embeddings': 'last_batch'}})
    failed = [f for ok, f, _ in cm3.config_checks(whole, 100, 50) if not ok]
    assert failed == [f'model.{field}']
    whole.eval.embeddings = 'later'
    assert 'eval.embeddings' in [f for ok, f, _ in cm3.config_checks(whole, 100, 50) if not ok]


def test_numeric_fields_share_a_program_layers_do_not():
    points = [p.config for p in grid.expand_grid(cm3_configs.get_config('baby'))]
    signatures = {sweep.static_signature(p) for p in points}
    assert len(signatures) == 2  # one per n_ui_layers; gamma, max_sim, alpha are vmapped
    assert set(cm3.MODEL.sweep_fields) >= {'model.gamma', 'model.max_sim', 'model.alpha',
                                           'model.min_sim'}


# ----------------------------------------------------------------------------------------------
# Through the generic trainer
# ----------------------------------------------------------------------------------------------

def test_short_training_beats_most_popular(tmp_path):
    from tests.test_train import tiny_dataset as clustered_dataset
    data = train.prepare_data(clustered_dataset(n_users=120, n_items=60), 'cm3')
    cfg = cm3_configs.get_config()
    cfg.model.embedding_size, cfg.model.knn_k = 8, 5
    cfg.optim.learning_rate = (0.01,)
    cfg.train.epochs, cfg.train.stopping_step, cfg.train.batch_size = 4, 10, 128
    cfg.eval.batch_size = 128
    point = grid.expand_grid(cfg)[0].config
    result = train.train_and_evaluate(point, data, tmp_path)
    losses = [h['loss'] for h in result['history']]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    popular = evaluation.evaluate_popularity(data.dataset.train.items, data.dataset.n_items,
                                             data.valid)
    first = result['history'][0]['valid']['recall@20']
    assert result['best_valid']['recall@20'] > max(popular['recall@20'], first)


# ----------------------------------------------------------------------------------------------
# model.matmul_dtype = 'bfloat16'
# ----------------------------------------------------------------------------------------------

def small_point(**model) -> ml_collections.ConfigDict:
    cfg = cm3_configs.get_config()
    cfg.model.embedding_size, cfg.model.knn_k = 8, 5
    cfg.optim.learning_rate = (0.01,)
    cfg.train.batch_size, cfg.eval.batch_size = 128, 128
    for k, v in model.items():
        cfg.model[k] = v
    return grid.expand_grid(cfg)[0].config


@pytest.fixture(scope='module')
def trainer_data():
    from tests.test_train import tiny_dataset as clustered_dataset
    return train.prepare_data(clustered_dataset(n_users=120, n_items=60), 'cm3')


def test_bfloat16_runs_the_feature_products_in_bfloat16(trainer_data):
    """'float32' is the program without the field, bit for bit; 'bfloat16' runs both towers'
    first layers and both projections (forward and kernel gradient) with bfloat16 operands and
    float32 results, and stays close to float32."""
    runs = first_steps_by_dtype(small_point, trainer_data)

    n, dims = 60, (12, 6)  # items; the image and text widths of the dataset
    want = []
    for d in dims:
        for h in (4 * 8, 8):  # a tower's hidden layer, a projection
            want += [(tensor(n, d, 'bf16'), tensor(d, h, 'bf16'), tensor(n, h, 'f32')),
                     (tensor(n, d, 'bf16'), tensor(n, h, 'bf16'), tensor(d, h, 'f32'))]
    assert bfloat16_dots(runs['bfloat16'][0]) == sorted(want)
    # The l2-normalised projections feed cosine terms that see the rounding once more:
    # measured 2.4e-2 norm-wise, and 0.114 on the text projection's kernel (6-wide features).
    assert_close_not_equal(runs['float32'][1:], runs['bfloat16'][1:], leaf_rtol=0.15,
                           total_rtol=4e-2)


def test_bfloat16_stores_the_features_in_bfloat16(trainer_data):
    prepared = trainer_data.model
    f32 = cm3.frozen_inputs(prepared, None, small_point().model)
    assert f32.image is prepared.image and f32.text is prepared.text  # as prepared, no copy
    cfg = small_point(matmul_dtype='bfloat16')
    bf16 = cm3.frozen_inputs(prepared, None, cfg.model)
    for a, b in ((f32.image, bf16.image), (f32.text, bf16.text)):
        assert a.dtype == np.float32 and b.dtype == jnp.bfloat16 and 2 * b.nbytes == a.nbytes
        np.testing.assert_array_equal(b, a.astype(jnp.bfloat16))
    # The kNN graph is built from the float32 features either way.
    np.testing.assert_array_equal(bf16.item_item.todense(), f32.item_item.todense())
    from lirdrec_jax import parallel
    placed = train.setup_point(cfg, trainer_data, parallel.Partitioner(num_devices=1)).frozen
    assert (placed.image.dtype, placed.text.dtype) == (jnp.bfloat16, jnp.bfloat16)


def test_bfloat16_training_stays_close(trainer_data, tmp_path):
    assert_training_close(lambda dtype: small_point(matmul_dtype=dtype), trainer_data, tmp_path)


def test_config_checks_name_matmul_dtype():
    m = point_model(cm3_configs.get_config('baby'))
    whole = ml_collections.ConfigDict({'model': m, 'eval': {'embeddings': 'last_batch'}})
    assert_matmul_dtype_checks(cm3.config_checks, whole, 100, 50)
