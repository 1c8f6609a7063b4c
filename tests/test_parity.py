"""Parity machinery in CI: weight conversion round trips, and the full parity procedure against
an independent PyTorch restatement (tests/torch_restatement.py), which must PASS, and against
deliberately wrong restatements, which must FAIL."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from configs import test as test_config  # noqa: E402
from lirdrec_jax import synthetic  # noqa: E402
from lirdrec_jax import data as data_lib  # noqa: E402
from lirdrec_jax import grid, optim, train  # noqa: E402
from lirdrec_jax.models import lirdrec  # noqa: E402
from lirdrec_jax.parity import checks, convert, reference  # noqa: E402
from lirdrec_jax.parity import lirdrec as run  # noqa: E402
from tests import torch_restatement as R  # noqa: E402


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp('parity')
    folder = synthetic.write_synthetic_dataset(root, 'small', n_users=300, n_items=150, seed=3,
                                               image_dim=48, text_dim=32)
    dataset = data_lib.load_mmrec(root, 'small')
    cfg = test_config.get_config()
    cfg.data.data_dir, cfg.data.dataset = str(root), 'small'
    point = grid.expand_grid(cfg)[0].config
    return dataset, folder, point


def our_params(dataset, point):
    prepared = train.prepare_data(dataset, 'lirdrec')
    net = lirdrec.create(point.model, dataset.n_users, dataset.n_items)
    frozen = lirdrec.Frozen(prepared.model.features, prepared.model.user_item,
                            lirdrec.item_graph(prepared.model, point.model.knn_k, 0.1))
    params, _ = lirdrec.init(jax.random.PRNGKey(1), net, frozen, frozen)
    return jax.tree.map(np.asarray, params)


def features(dataset):
    return {'image': dataset.image_feat, 'text': dataset.text_feat}


def restated_model(dataset, folder, point):
    model, _, staging = reference.build_reference_model(None, point, dataset, folder,
                                                        model_class=R.RestatedLIRDRec)
    staging.cleanup()
    return model


def test_params_round_trip_through_a_state_dict_the_torch_model_loads(small):
    dataset, folder, point = small
    params = our_params(dataset, point)
    state_dict = run.params_to_state_dict(params, features(dataset))
    model = restated_model(dataset, folder, point)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    back = run.state_dict_to_params(model.state_dict(), params, features(dataset))
    jax.tree.map(np.testing.assert_array_equal, back, params)
    # The torch model computes with exactly these weights.
    np.testing.assert_array_equal(model.v_MLP.weight.detach().numpy(),
                                  params['image_tower']['hidden']['kernel'].T)


def test_conversion_errors_name_the_key(small):
    dataset, folder, point = small
    params = our_params(dataset, point)
    good = run.params_to_state_dict(params, features(dataset))
    with pytest.raises(convert.ConversionError, match=r"unknown reference key\(s\) \['extra'\]"):
        run.state_dict_to_params({**good, 'extra': np.zeros(1)}, params)
    missing = {k: v for k, v in good.items() if k != 'fusion_module.theta'}
    with pytest.raises(convert.ConversionError, match="lacks key.*fusion_module.theta"):
        run.state_dict_to_params(missing, params)
    wrong = {**good, 't_MLP.weight': np.zeros((3, 4), np.float32)}
    with pytest.raises(convert.ConversionError, match="shape mismatch for reference key 't_MLP.weight'"):
        run.state_dict_to_params(wrong, params)
    bad_features = {**good, 'image_embedding.weight': good['image_embedding.weight'] + 1}
    with pytest.raises(convert.ConversionError, match='image_embedding.weight'):
        run.state_dict_to_params(bad_features, params, features(dataset))


def test_adam_and_pwc_state_import_from_a_live_torch_model(small):
    dataset, folder, point = small
    model = restated_model(dataset, folder, point)
    model.pre_epoch_processing()
    trainer = R.RestatedTrainer(reference.reference_config(point, '', 'small'), model)
    batch = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    trainer.optimizer.zero_grad()
    model.calculate_loss(batch).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    before = run.state_dict_to_params(model.state_dict(), our_params(dataset, point))
    trainer.optimizer.step()
    template = before
    names = [k for k, _ in model.named_parameters()]
    imported = run.adam_state_from_torch(trainer.optimizer.state_dict()['state'], names,
                                             template)
    # Our Adam on the same gradients yields the same moments.
    our_grads = run.state_dict_to_params({**{k: np.zeros(p.shape, np.float32)
                                                 for k, p in model.state_dict().items()
                                                 if k in run.PARAM_TABLE},
                                              **{k: g.numpy() for k, g in grads.items()
                                                 if k in run.PARAM_TABLE}}, template)
    opt = optim.create_optimizer()
    _, state = train.apply_gradients(opt, jax.tree.map(jnp.asarray, before),
                                     opt.init(jax.tree.map(jnp.asarray, before)),
                                     jax.tree.map(jnp.asarray, our_grads), 1e-3)
    adam = state[0]
    assert int(adam.count) == imported['count'] == 1
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12),
                 jax.tree.map(np.asarray, adam.mu), imported['mu'])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-20),
                 jax.tree.map(np.asarray, adam.nu), imported['nu'])
    pwc = run.training_state_from_reference(model)
    assert pwc.epochs_started == 1 and pwc.w1 == pytest.approx(0.81 / 0.91)
    assert pwc.attention.shape == (dataset.n_users, 3)


def restated_side(model_class=R.RestatedLIRDRec):
    return run.ReferenceSide(model_class, R.RestatedTrainer)


def test_parity_passes_against_the_independent_restatement(small):
    dataset, folder, point = small
    results = run.run_parity(restated_side(), point, dataset, folder, epochs=2,
                             log=lambda _: None)
    failed = [c for c in results if not c.passed]
    assert not failed, checks.report(results)
    names = [c.name for c in results]
    for expected in ('user-item adjacency: values', 'item-item kNN graph: structure',
                     'DCT view features', 'forward: user embeddings', 'loss on one batch',
                     'gradient v_MLP.weight', 'after one Adam step fusion_module.theta',
                     'valid top-50 lists', 'epoch boundary: theta <- last attention',
                     'PWC w1, w2 at epoch 2', 'epoch 1 start: theta (last attention)',
                     'epoch 1: test metrics', 'parameters after 2 epochs: fusion_module.theta'):
        assert expected in names
    # Every parameter the loss depends on (all but the reference's two unused feature copies).
    assert sum(n.startswith('gradient ') for n in names) == len(run.PARAM_TABLE) == 25


class OneLayerFewer(R.RestatedLIRDRec):
    n_layers_offset = -1


class RowNormalised(R.RestatedLIRDRec):
    """A wrong normalisation: D^-1 A instead of D^-1/2 A D^-1/2."""

    def __init__(self, config, train_data):
        super().__init__(config, train_data)
        binary = (self.norm_adj.to_dense() > 0).float()
        self.norm_adj = (binary / (binary.sum(1, keepdim=True) + 1e-7)).to_sparse()


@pytest.mark.parametrize('model_class,failing', [
    (OneLayerFewer, 'forward: user embeddings'),
    (RowNormalised, 'user-item adjacency: values'),
])
def test_parity_fails_against_a_perturbed_model(small, model_class, failing):
    dataset, folder, point = small
    results = run.run_parity(restated_side(model_class), point, dataset, folder, epochs=0,
                             log=lambda _: None)
    by_name = {c.name: c for c in results}
    assert not by_name[failing].passed
    assert not all(c.passed for c in results)


def test_saved_state_dict_file_converts(small, tmp_path):
    dataset, folder, point = small
    model = restated_model(dataset, folder, point)
    torch.save(model.state_dict(), tmp_path / 'model.pt')
    params = run.state_dict_to_params(convert.load_state_dict_file(tmp_path / 'model.pt'),
                                          our_params(dataset, point), features(dataset))
    np.testing.assert_array_equal(params['fusion']['theta'],
                                  model.fusion_module.theta.detach().numpy())
    torch.save([1, 2], tmp_path / 'not_a_state_dict.pt')
    with pytest.raises(convert.ConversionError, match='not_a_state_dict.pt holds a list'):
        convert.load_state_dict_file(tmp_path / 'not_a_state_dict.pt')


def test_reference_grads_in_float64_convert_parameters_and_tensor_attributes():
    from lirdrec_jax.parity.common import reference_grads_in_float64

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
            self.x = torch.tensor([1e8, 3.0])  # a plain float32 attribute (like a graph)

        def loss(self):
            return ((self.x + self.w) ** 2).sum()

    model = Model()
    model.cached = model.w * 2  # a tensor with autograd history, as a last forward leaves
    model.loss().backward()
    g32 = model.w.grad.numpy().copy()
    g64 = reference_grads_in_float64(model, lambda m: m.loss())['w']
    # float32 loses w next to 1e8: 2 * (1e8 + 1) rounds to 2e8; float64 keeps it.
    assert g32[0] == np.float32(2e8) and g64[0] == 2 * (1e8 + 1)
    assert g64.dtype == np.float64 and g64[1] == 2 * (3.0 + 2.0)
    # The model itself is untouched.
    assert model.w.dtype == torch.float32 and model.x.dtype == torch.float32
    assert model.cached.grad_fn is not None
