"""CM3's parity machinery in CI (lirdrec_jax/parity/cm3.py): the reference's config keys, the
CPU shim, the recording and replay of Beta draws, the name table both ways, our Adam against
torch's, and the full parity procedure against the independent PyTorch restatement with the
reference's interface (tests/torch_cm3.py), which must PASS, and against deliberately wrong
restatements, which must FAIL at the check that localises the fault."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from configs import cm3 as cm3_configs  # noqa: E402
from lirdrec_jax import data as data_lib  # noqa: E402
from lirdrec_jax import grid, optim, synthetic, train  # noqa: E402
from lirdrec_jax.models import cm3  # noqa: E402
from lirdrec_jax.parity import checks, reference  # noqa: E402
from lirdrec_jax.parity import cm3 as run  # noqa: E402
from lirdrec_jax.parity.common import ReferenceSide  # noqa: E402
from tests import torch_cm3 as T  # noqa: E402
from tests.torch_restatement import MMREC_FRAMEWORK_KEYS, RestatedTrainer  # noqa: E402

# The keys models/cm3.py reads from its config, read off its source (besides the framework's,
# MMREC_FRAMEWORK_KEYS).
CM3_KEYS = {'gamma', 'embedding_size', 'feat_embed_dim', 'knn_k', 'lambda_coeff', 'n_mm_layers',
            'n_ui_layers', 'mm_image_weight', 'dropout', 'max_sim', 'min_sim', 'alpha'}


@pytest.fixture(scope='module', autouse=True)
def one_torch_thread():
    """The restatement's tensors are tiny: one torch thread is faster than two that wait for
    each other on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config():
    c = cm3_configs.get_config()
    c.model.embedding_size = 16
    c.model.knn_k = 5
    c.model.max_sim = (0.8,)  # the clamp binds (Unclamped must fail)
    c.optim.learning_rate = (0.005,)
    c.train.batch_size = 256
    c.eval.batch_size = 128
    return c


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp('parity_cm3')
    folder = synthetic.write_synthetic_dataset(root, 'small', n_users=300, n_items=150, seed=3,
                                               image_dim=48, text_dim=32)
    dataset = data_lib.load_mmrec(root, 'small')
    cfg = small_config()
    cfg.data.data_dir, cfg.data.dataset = str(root), 'small'
    point = grid.expand_grid(cfg)[0].config
    return dataset, folder, point


def side(model_class=T.RestatedCM3):
    return ReferenceSide(run.with_cpu_shim(model_class), RestatedTrainer)


def restated_model(dataset, folder, point, model_class=T.RestatedCM3):
    model, config, staging = reference.build_reference_model(
        None, point, dataset, folder, model_class=run.with_cpu_shim(model_class))
    staging.cleanup()
    return model, config


def test_reference_config_has_exactly_the_keys_cm3_reads(small):
    _, _, point = small
    config = reference.reference_config(point, '/data/', 'small')
    assert set(config) == MMREC_FRAMEWORK_KEYS | CM3_KEYS
    assert config['model'] == 'CM3' and config['dropout'] == 0.0
    assert (config['gamma'], config['max_sim'], config['min_sim'], config['alpha']) == (
        0.5, 0.8, 0.0, 0.5)
    assert config['feat_embed_dim'] == config['embedding_size'] == 16


def test_cpu_shim_unregisters_result_embed(small):
    dataset, folder, point = small

    class Unshimmed(T.RestatedCM3):
        pass

    model, config, staging = reference.build_reference_model(None, point, dataset, folder,
                                                             model_class=Unshimmed)
    staging.cleanup()
    model.pre_epoch_processing()
    # As the reference on a CPU: the forward pass assigns to a registered Parameter.
    with pytest.raises(TypeError, match='result_embed'):
        model.forward(model.masked_adj)
    run.unregister_result_embed(model)
    assert 'result_embed' not in dict(model.named_parameters())
    assert 'result_embed' not in model.state_dict()
    model.forward(model.masked_adj)
    assert model.result_embed.shape == (dataset.n_users + dataset.n_items, 3 * 16)
    # The class patch runs the same after every construction, once however often applied.
    shimmed = run.with_cpu_shim(run.with_cpu_shim(Unshimmed))
    assert shimmed is Unshimmed
    fresh, _ = restated_model(dataset, folder, point, Unshimmed)
    assert 'result_embed' not in dict(fresh.named_parameters())


def test_beta_draws_are_recorded_and_replayed():
    beta = torch.distributions.Beta(0.5, 0.5)
    with run.record_beta_draws() as draws:
        first, second = beta.sample((7,)), beta.sample((7,))
    assert len(draws) == 2 and torch.equal(draws[0], first) and torch.equal(draws[1], second)
    with run.replay_beta_draws(draws) as used:
        assert torch.equal(beta.sample((7,)), first)
        assert torch.equal(beta.sample((7,)), second)
        with pytest.raises(RuntimeError, match='more than the 2 recorded'):
            beta.sample((7,))
    assert len(used) == 2
    with run.replay_beta_draws(draws):
        with pytest.raises(RuntimeError, match='shape'):
            beta.sample((5,))
    # Outside the blocks, Beta draws afresh again.
    assert not torch.equal(beta.sample((7,)), first)
    assert 'sample' not in torch.distributions.Beta.__dict__


def test_name_table_round_trip_through_a_state_dict_the_torch_model_loads(small):
    dataset, folder, point = small
    model, _ = restated_model(dataset, folder, point)
    assert set(run.PARAM_TABLE) | set(run.FEATURE_KEYS) == set(model.state_dict())
    prepared = train.prepare_data(dataset, 'cm3')
    net = cm3.create(point.model, dataset.n_users, dataset.n_items)
    frozen = cm3.frozen_inputs(prepared.model, dataset, point.model)
    ours, _ = cm3.init(jax.random.PRNGKey(1), net, frozen, frozen)
    features = {'image': dataset.image_feat, 'text': dataset.text_feat}
    exported = run.params_to_state_dict(ours, features)
    model.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=True)
    back = run.state_dict_to_params(model.state_dict(), ours, features)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, ours))
    np.testing.assert_array_equal(model.text_nn.weight.detach().numpy(),
                                  np.asarray(ours['text_projection']['kernel']).T)
    assert model.theta.shape == ours['theta'].shape == (dataset.n_users, 3, 1)


def test_our_adam_follows_torch_adam_over_many_steps():
    """optim.create_optimizer against torch.optim.Adam on the same gradient stream: equal to
    float32 rounding after 2000 steps. optax's own scale_by_adam (bias corrections with b2
    rounded to float32) drifts: every step about 6e-6 too short, always in the same
    direction."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(500).astype(np.float32)
    grads = (rng.standard_normal((2000, 500)) * 1e-3 + 1e-4).astype(np.float32)
    tp = torch.nn.Parameter(torch.tensor(p0))
    topt = torch.optim.Adam([tp], lr=1e-3)
    for g in grads:
        tp.grad = torch.tensor(g)
        topt.step()

    def run_optax(transform):
        def body(state, g):
            params, opt_state = state
            return train.apply_gradients(transform, params, opt_state, g, 1e-3), None
        params = jnp.asarray(p0)
        final, _ = jax.jit(lambda p: jax.lax.scan(body, (p, transform.init(p)),
                                                  jnp.asarray(grads)))(params)
        return np.asarray(final[0])

    import optax
    ref, moved = tp.detach().numpy(), np.abs(tp.detach().numpy() - p0).max()
    ours = run_optax(optim.create_optimizer())
    plain = run_optax(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8))
    assert moved > 0.1
    assert np.abs(ours - ref).max() < 1e-6
    assert np.abs(plain - ref).max() > 2e-6  # the must-fail: optax's bias corrections


def test_parity_passes_against_the_independent_restatement(small):
    dataset, folder, point = small
    results = run.run_parity(side(), point, dataset, folder, epochs=2, log=lambda _: None)
    failed = [c for c in results if not c.passed]
    assert not failed, checks.report(results)
    names = [c.name for c in results]
    for expected in ('user-item adjacency: values', 'item-item kNN graph: structure',
                     'export: state_dict loaded by the reference (strict)',
                     'forward: Beta draws captured', 'slerp: parallel text/image projections',
                     'forward: slerp mix', 'forward: result_embed, items', 'loss on one batch',
                     'evaluation embeddings of that batch (carry = result_embed)',
                     'no gradient for image_embedding / text_embedding (never read)',
                     'after one Adam step text_nn.bias', 'valid top-50 lists',
                     'test metrics, same embeddings', 'epoch 1: Beta draws imported',
                     'epoch 1: summed training loss', 'epoch 1: test metrics',
                     'parameters after 2 epochs: image_nn.weight'):
        assert expected in names
    grads = {c.name[len('gradient '):] for c in results if c.name.startswith('gradient ')}
    assert grads == set(run.PARAM_TABLE)


@pytest.mark.parametrize('model_class,failing', [
    (T.LinearMix, 'forward: slerp mix'),
    (T.UniqueUsers, 'loss on one batch'),
    (T.DetachedSimilarity, 'gradient text_nn.weight'),
])
def test_parity_fails_against_a_perturbed_model(small, model_class, failing):
    dataset, folder, point = small
    results = run.run_parity(side(model_class), point, dataset, folder, epochs=0,
                             log=lambda _: None)
    by_name = {c.name: c for c in results}
    assert not by_name[failing].passed, checks.report(results)
    first = next(c for c in results if not c.passed)
    assert first.name == failing, checks.report(results)
