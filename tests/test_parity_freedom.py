"""FREEDOM's parity machinery in CI (lirdrec_jax/parity/freedom.py): the name table both ways,
the recovery of an epoch's kept edges from a masked adjacency and our rebuild from them, the
reference config's keys, and the full parity procedure against an independent PyTorch
restatement with the reference's interface (tests/torch_freedom_reference.py), which must PASS,
and against deliberately wrong restatements, which must FAIL at the right check."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from configs import freedom as freedom_configs  # noqa: E402
from lirdrec_jax import data as data_lib  # noqa: E402
from lirdrec_jax import graph, grid, synthetic, train  # noqa: E402
from lirdrec_jax.models import freedom  # noqa: E402
from lirdrec_jax.parity import checks, reference  # noqa: E402
from lirdrec_jax.parity import freedom as run  # noqa: E402
from lirdrec_jax.parity.common import ReferenceSide  # noqa: E402
from tests import torch_freedom as T  # noqa: E402
from tests import torch_freedom_reference as R  # noqa: E402
from tests.torch_restatement import MMREC_FRAMEWORK_KEYS, RestatedTrainer  # noqa: E402

# The keys models/freedom.py reads from its config, read off its source (besides the framework's,
# MMREC_FRAMEWORK_KEYS).
FREEDOM_KEYS = {
    'embedding_size', 'feat_embed_dim', 'knn_k', 'lambda_coeff', 'cf_model', 'n_mm_layers',
    'n_ui_layers', 'reg_weight', 'mm_image_weight', 'dropout', 'degree_ratio'}


def small_config():
    c = freedom_configs.get_config()
    c.model.embedding_size = 16
    c.model.knn_k = 5
    c.model.dropout = (0.8,)
    c.model.reg_weight = (0.001,)  # > 0: the feature tables and projections get gradients
    c.optim.learning_rate = (0.005,)
    c.train.batch_size = 256
    c.eval.batch_size = 128
    return c


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp('parity_freedom')
    folder = synthetic.write_synthetic_dataset(root, 'small', n_users=300, n_items=150, seed=3,
                                               image_dim=48, text_dim=32)
    dataset = data_lib.load_mmrec(root, 'small')
    cfg = small_config()
    cfg.data.data_dir, cfg.data.dataset = str(root), 'small'
    point = grid.expand_grid(cfg)[0].config
    return dataset, folder, point


def restated_model(dataset, folder, point, model_class=R.RestatedFREEDOM):
    model, config, staging = reference.build_reference_model(None, point, dataset, folder,
                                                             model_class=model_class)
    staging.cleanup()
    return model, config


def side(model_class=R.RestatedFREEDOM):
    return ReferenceSide(model_class, RestatedTrainer)


def test_reference_config_has_exactly_the_keys_freedom_reads(small):
    dataset, folder, point = small
    config = reference.reference_config(point, '/data/', 'small')
    assert set(config) == MMREC_FRAMEWORK_KEYS | FREEDOM_KEYS
    assert config['model'] == 'FREEDOM' and config['dropout'] == 0.8
    assert config['feat_embed_dim'] == config['embedding_size'] == 16
    assert config['learning_rate_scheduler'] == [1.0, 50.0]
    assert config['missing key'] is None  # the reference's Config reads absent keys as None


def test_name_table_round_trip_through_a_state_dict_the_torch_model_loads(small):
    dataset, folder, point = small
    model, _ = restated_model(dataset, folder, point)
    table = run.param_table(run.modalities_of(dataset))
    assert set(table) == set(model.state_dict())
    prepared = train.prepare_data(dataset, 'freedom')
    net = freedom.create(point.model, dataset.n_users, dataset.n_items)
    frozen = freedom.frozen_inputs(prepared.model, dataset, point.model)
    ours, _ = freedom.init(jax.random.PRNGKey(1), net, frozen, frozen)
    ours = jax.tree.map(np.asarray, ours)
    exported = run.export_params(ours, table)
    model.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=True)
    back = run.import_state_dict(model.state_dict(), ours, table)
    jax.tree.map(np.testing.assert_array_equal, back, ours)
    # The torch model computes with exactly these weights (a Linear weight is our kernel^T).
    np.testing.assert_array_equal(model.image_trs.weight.detach().numpy(),
                                  ours['image_trs']['kernel'].T)


def test_kept_edges_are_recovered_and_rebuilt_with_their_own_degrees():
    n_users, n_items = 4, 5
    # The reference's layout: (user, U + item) entries, then the same flipped, not coalesced.
    # (2, 3) is listed twice: the recovery reads the raw entries.
    users = np.array([0, 2, 1, 2, 3])
    items = np.array([1, 3, 4, 3, 0])
    upper = np.stack([users, items + n_users])
    indices = torch.tensor(np.concatenate([upper, upper[::-1]], axis=1))
    masked = torch.sparse_coo_tensor(indices, torch.ones(indices.shape[1]),
                                     (n_users + n_items,) * 2, check_invariants=True)
    got_users, got_items = run.kept_edges(masked, n_users)
    np.testing.assert_array_equal(got_users, users)
    np.testing.assert_array_equal(got_items, items)
    rebuilt = run.bcoo_to_scipy(run.pruned_adjacency_from(got_users, got_items, n_users,
                                                          n_items)).toarray()
    expected = T.dense_pruned_adjacency(users, items, n_users, n_items).double().numpy()
    np.testing.assert_allclose(rebuilt, expected, atol=1e-7)
    # A coalesced tensor reads each kept pair once.
    users_c, items_c = run.kept_edges(masked.coalesce(), n_users)
    assert sorted(zip(users_c, items_c)) == sorted(set(zip(users, items)))


def test_edge_checks_ignore_order_but_not_multiplicity():
    edges = graph.train_edges(np.array([0, 1, 1, 2, 2]), np.array([1, 0, 2, 2, 0]), 3, 3)
    weights = np.asarray(edges.weights)
    order = np.array([3, 1, 0, 4, 2])
    ref_indices = np.stack([np.asarray(edges.users), np.asarray(edges.items)])[:, order]
    assert all(c.passed for c in run._edge_checks(edges, ref_indices, weights[order]))
    # An edge listed twice on the other side (the repeated training row a reference without
    # deduplication would keep): a different multiset.
    twice = np.concatenate([ref_indices, ref_indices[:, :1]], axis=1)
    doubled = run._edge_checks(edges, twice, np.concatenate([weights[order], weights[order][:1]]))
    assert not any(c.passed for c in doubled)


def test_parity_passes_against_the_independent_restatement(small):
    dataset, folder, point = small
    results = run.run_parity(side(), point, dataset, folder, epochs=2, log=lambda _: None)
    failed = [c for c in results if not c.passed]
    assert not failed, checks.report(results)
    names = [c.name for c in results]
    for expected in ('user-item adjacency: values', 'item-item kNN graph: structure',
                     'pruning: edge multiset', 'pruning: sampling weights 1/sqrt(d_u d_i)',
                     'initial image_embedding.weight = our image features',
                     'export: state_dict loaded by the reference (strict)',
                     'forward, full graph: user embeddings',
                     'pruned adjacency (epoch 0 draw): kept edges',
                     'pruned adjacency (epoch 0 draw): values',
                     'forward, pruned graph: item embeddings', 'loss on one batch',
                     'after one Adam step text_trs.bias', 'valid top-50 lists',
                     'test metrics, same embeddings', 'epoch 1: pruned adjacency: values',
                     'epoch 1: summed training loss', 'epoch 1: test metrics',
                     'parameters after 2 epochs: image_trs.bias',
                     'epoch 1: perturbed reference drew the same graph'):
        assert expected in names
    # A gradient check for every parameter, all of them non-trivial here (reg_weight > 0).
    grads = {c.name[len('gradient '):]: c for c in results if c.name.startswith('gradient ')}
    assert set(grads) == set(run.param_table(('image', 'text')))


def test_parity_passes_with_dropout_0_and_one_modality(small, tmp_path):
    # Dropout 0 trains on the full adjacency on both sides; without a text file, the reference
    # builds neither the text table nor its projection, and the name table follows.
    dataset, folder, point = small
    point = point.copy_and_resolve_references()
    point.model.dropout = 0.0
    point.data.text_file = ''
    dataset = dataset._replace(text_feat=None)
    results = run.run_parity(side(), point, dataset, folder, epochs=1, log=lambda _: None)
    assert all(c.passed for c in results), checks.report(results)
    names = [c.name for c in results]
    assert 'training graph (dropout 0: the full adjacency): values' in names
    assert 'gradient image_trs.weight' in names and 'gradient text_trs.weight' not in names


@pytest.mark.parametrize('model_class,failing', [
    (R.SumOverLayers, 'forward, full graph: user embeddings'),
    (R.RowNormalised, 'user-item adjacency: values'),
    (R.FullDegreePruning, 'pruned adjacency (epoch 0 draw): values'),
    (R.FrozenImageTable, 'gradient image_embedding.weight'),
])
def test_parity_fails_against_a_perturbed_model(small, model_class, failing):
    dataset, folder, point = small
    results = run.run_parity(side(model_class), point, dataset, folder, epochs=0,
                             log=lambda _: None)
    by_name = {c.name: c for c in results}
    assert not by_name[failing].passed, checks.report(results)
    # Nothing before the failing check fails: the sequence localises the fault.
    first = next(c for c in results if not c.passed)
    assert first.name == failing, checks.report(results)

