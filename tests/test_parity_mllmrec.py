"""MLLMRec's parity machinery in CI (lirdrec_jax/parity/mllmrec.py): the reference config's keys,
the name table both ways, the tie bookkeeping of the item graph, and the full parity procedure
against an independent PyTorch restatement with the reference's interface
(tests/torch_mllmrec.py's `RestatedMLLMRec`), which must PASS, and against deliberately wrong
restatements, which must FAIL at the right check."""
import jax
import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip('torch')

from configs import mllmrec as mllmrec_configs  # noqa: E402
from lirdrec_jax import experiment, grid, synthetic, train  # noqa: E402
from lirdrec_jax.models import mllmrec  # noqa: E402
from lirdrec_jax.parity import checks, reference  # noqa: E402
from lirdrec_jax.parity import mllmrec as run  # noqa: E402
from lirdrec_jax.parity.common import ReferenceSide  # noqa: E402
from tests import torch_mllmrec as T  # noqa: E402
from tests.torch_restatement import MMREC_FRAMEWORK_KEYS, RestatedTrainer  # noqa: E402

# The keys models/mllmrec.py and the two file names read from its config, read off its source
# (besides the framework's, MMREC_FRAMEWORK_KEYS). alpha1,
# alpha2, beta are read too but absent from its yaml files (None), as here.
MLLMREC_KEYS = {'feat_embed_dim', 'n_ii_layers', 'n_ui_layers', 'knn_k', 'knn_jac', 'pure',
                'image_text_feature_file', 'user_preference_feature_file', 'req_training',
                'weight_decay'}


def small_config():
    c = mllmrec_configs.get_config()
    c.model.feat_embed_dim = (16,)
    c.model.knn_k = 5
    c.model.knn_jac = (5,)
    c.model.pure = (0.2,)   # the synthetic text rows' neighbours have cosines around 0.15-0.3
    c.optim.learning_rate = (0.005,)
    c.train.batch_size = 256
    c.eval.batch_size = 128
    return c


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp('parity_mllmrec')
    # Short histories and a 3-core: some items have exactly one training user (the float32
    # "diagonal" quirk) and Jaccard values tie.
    folder = synthetic.write_synthetic_dataset(root, 'small', n_users=300, n_items=250, seed=3,
                                               image_dim=48, text_dim=32, core=3, min_length=4,
                                               mean_length=7)
    cfg = small_config()
    cfg.data.data_dir, cfg.data.dataset = str(root), 'small'
    dataset = experiment.load_dataset(cfg.data, mllmrec.MODEL.input_files)
    point = grid.expand_grid(cfg)[0].config
    return dataset, folder, point


def side(model_class=T.RestatedMLLMRec):
    return ReferenceSide(model_class, RestatedTrainer)


def test_reference_config_has_exactly_the_keys_mllmrec_reads(small):
    dataset, folder, point = small
    config = reference.reference_config(point, '/data/', 'small')
    assert set(config) == MMREC_FRAMEWORK_KEYS | MLLMREC_KEYS
    assert config['model'] == 'MLLMRec' and config['pure'] == 0.2 and config['knn_jac'] == 5
    assert config['image_text_feature_file'] == 'image_text_feat.npy'
    assert config['user_preference_feature_file'] == 'user_preferences_feat.npy'
    assert config['req_training'] is True and config['weight_decay'] == 0.0
    assert config['alpha1'] is None


def test_staging_folder_links_the_input_files(small):
    dataset, folder, point = small
    model, config, staging = reference.build_reference_model(
        None, point, dataset, folder, model_class=T.RestatedMLLMRec)
    try:
        staged = sorted(p.name for p in (reference.Path(staging.name) / 'small').iterdir())
        assert staged == ['image_feat.npy', 'image_text_feat.npy', 'text_feat.npy',
                          'user_preferences_feat.npy']
    finally:
        staging.cleanup()
    np.testing.assert_array_equal(model.item_feat_embedding.weight.numpy(),
                                  dataset.extra['image_text_file'])


def test_name_table_round_trip_through_a_state_dict_the_torch_model_loads(small):
    dataset, folder, point = small
    model, _, staging = reference.build_reference_model(None, point, dataset, folder,
                                                        model_class=T.RestatedMLLMRec)
    staging.cleanup()
    assert set(run.PARAM_TABLE) | set(run.FEATURE_KEYS) == set(model.state_dict())
    prepared = train.prepare_data(dataset, 'mllmrec')
    net = mllmrec.create(point.model, dataset.n_users, dataset.n_items)
    frozen = mllmrec.frozen_inputs(prepared.model, dataset, point.model)
    ours, _ = mllmrec.init(jax.random.PRNGKey(1), net, frozen, frozen)
    ours = jax.tree.map(np.asarray, ours)
    exported = run.export_params(ours, {'items': prepared.model.items,
                                        'users': prepared.model.users})
    model.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=True)
    back = run.import_state_dict(model.state_dict(), ours)
    jax.tree.map(np.testing.assert_array_equal, back, ours)
    np.testing.assert_array_equal(model.MLP_u_1.weight.detach().numpy(),
                                  ours['user_tower']['out']['kernel'].T)


def test_jaccard_ties_on_paper():
    # Items 2 and 3 share their only user; item 4 shares one user with each of items 0 and 1
    # (tests/test_mllmrec.py's paper case). With knn_jac = 1, row 2 has two equal values
    # (2, 2) and (2, 3), row 3 likewise, row 4 (4, 0) and (4, 1); rows 0 and 1 have one value.
    from tests.test_mllmrec import PAPER_FEATURES, PAPER_ITEMS, PAPER_USERS
    prepared = mllmrec.Prepared(PAPER_FEATURES, np.zeros((4, 1), np.float32), PAPER_USERS,
                                PAPER_ITEMS, 4, 5)
    amb = run.graph_ambiguity(prepared, knn_k=2, knn_jac=1, pure=0.9)
    np.testing.assert_array_equal(amb.tie_rows, [2, 3, 4])
    expected = np.zeros((5, 5))
    expected[2, 2] = expected[2, 3] = expected[3, 2] = expected[3, 3] = 1
    expected[4, 0] = expected[4, 1] = 1
    np.testing.assert_array_equal(amb.tied.toarray(), expected)
    assert amb.whole_rows.size == 0
    # With knn_jac = 2 every row keeps all its values: no ties. With pure at item 4's second
    # cosine (0.819...), that row's threshold is ambiguous.
    amb2 = run.graph_ambiguity(prepared, knn_k=2, knn_jac=2,
                               pure=float(np.cos(np.deg2rad(35.0))))
    assert amb2.tie_rows.size == 0 and amb2.tied.nnz == 0
    np.testing.assert_array_equal(amb2.whole_rows, [4])


def test_graph_checks_accept_another_tie_choice_and_nothing_else():
    from tests.test_mllmrec import PAPER_FEATURES, PAPER_ITEMS, PAPER_USERS
    prepared = mllmrec.Prepared(PAPER_FEATURES, np.zeros((4, 1), np.float32), PAPER_USERS,
                                PAPER_ITEMS, 4, 5)
    ours = mllmrec.item_graph(PAPER_FEATURES, PAPER_USERS, PAPER_ITEMS, 4, 5, 2, 1, 0.9)
    amb = run.graph_ambiguity(prepared, 2, 1, 0.9)
    # The other tie choice in row 4: (4, 1) instead of (4, 0). The same Jaccard value and row
    # sum, and rows 0 and 1 have the same sum (7/3): S_41 would be S_40.
    other = ours.toarray()
    other[4, 1], other[4, 0] = other[4, 0], 0.0
    results = run.graph_checks(ours, sp.csr_matrix(other), amb)
    assert all(c.passed for c in results), checks.report(results)
    # A changed value in a tie row outside its tied entries (B's self-loop of item 4) fails.
    wrong = other.copy()
    wrong[4, 4] *= 1.01
    results = run.graph_checks(ours, sp.csr_matrix(wrong), amb)
    assert [c.name for c in results if not c.passed] == [
        'item graph S, tie rows outside the tied entries: values']


@pytest.fixture(scope='module')
def restated_run(small):
    dataset, folder, point = small
    return run.run_parity(side(), point, dataset, folder, epochs=2, log=lambda _: None)


def test_parity_passes_against_the_independent_restatement(restated_run):
    results = restated_run
    failed = [c for c in results if not c.passed]
    assert not failed, checks.report(results)
    names = [c.name for c in results]
    for expected in ('item input F = reference item_feat_embedding',
                     'item graph S: structure', 'item graph S: values',
                     'item graph S, tie rows outside the tied entries: values',
                     "item inputs e, from the reference's graph",
                     'item inputs e, from our graph (rows no tie decides)',
                     'export: state_dict loaded by the reference (strict)',
                     'forward: item embeddings h_i', 'loss on one batch',
                     'after one Adam step MLP_1.bias', 'valid top-50 lists',
                     'test metrics, same embeddings', 'epoch 1: summed training loss',
                     'epoch 1: test metrics', 'parameters after 2 epochs: MLP_u.weight'):
        assert expected in names
    grads = {c.name[len('gradient '):] for c in results if c.name.startswith('gradient ')}
    assert grads == set(run.PARAM_TABLE)
    # The data has Jaccard ties, so the tie bookkeeping is exercised.
    tie_check = next(c for c in results
                     if c.name == 'item graph S, tie rows outside the tied entries: structure')
    assert not tie_check.note.startswith('0 tie rows'), tie_check.note


@pytest.mark.parametrize('model_class,failing', [
    (T.ExactDiagonal, 'item graph S: structure'),  # a freed top-k slot takes another item
    (T.LayerMean, "item inputs e, from the reference's graph"),
    (T.Relu, 'forward: user embeddings h_u'),
    (T.WithL2, 'loss on one batch'),
])
def test_parity_fails_against_a_perturbed_model(small, model_class, failing):
    dataset, folder, point = small
    results = run.run_parity(side(model_class), point, dataset, folder, epochs=0,
                             log=lambda _: None)
    first = next((c for c in results if not c.passed), None)
    assert first is not None and first.name == failing, checks.report(results)


def test_reference_trains_to_early_stopping_with_its_input_files(small):
    # `--full`: fit_reference stages only the feature files; MLLMRec's function links its two
    # input files before the (restated) reference is built, which reads them from there.
    from tests.torch_restated_fit import FittingTrainer, restated_loaders
    dataset, folder, point = small
    point = point.copy_and_resolve_references()
    point.train.epochs, point.train.stopping_step = 2, 1
    outcome = run.train_reference_to_early_stopping(
        ReferenceSide(T.RestatedMLLMRec, FittingTrainer), point, dataset, folder, seed=0,
        make_loaders=restated_loaders)
    assert outcome.epochs == 2 and 0 <= outcome.best_epoch <= 1
    assert 0.0 < outcome.test['recall@20'] <= 1.0
