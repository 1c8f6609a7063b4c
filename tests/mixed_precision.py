"""Shared checks of `model.matmul_dtype = 'bfloat16'` for every model's tests: the lowered
program's bfloat16 products, one batch's loss and gradients against float32, and a few epochs of
training against float32."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from lirdrec_jax import parallel, sampling, train


def tensor(*shape) -> str:
    """The StableHLO type of an array: tensor(70, 12, 'bf16') -> 'tensor<70x12xbf16>'."""
    return f'tensor<{"x".join(map(str, shape))}>'


def bfloat16_dots(lowered: str) -> list:
    """(lhs, rhs, result) types of the products with bfloat16 operands in a lowered program."""
    return sorted(re.findall(r'stablehlo\.dot_general[^\n]*: \((tensor<[^>]*bf16>), '
                             r'(tensor<[^>]*bf16>)\) -> (tensor<[^>]*>)', lowered))


def first_step(cfg, data) -> tuple:
    """(lowered program, loss, gradients) of the training loss on the first batch of epoch 0 of
    the point `cfg`, set up as the trainer sets it up (a fixed noise key)."""
    partitioner = parallel.Partitioner(num_devices=1)
    s = train.setup_point(cfg, data, partitioner)
    model = s.model
    batches = sampling.batch_kind(model.batch_kind).draw(sampling.epoch_rng(0, 0), data.sampler,
                                                        int(cfg.train.batch_size))
    batch = jax.tree.map(lambda x: jnp.asarray(x[0]), batches)
    _, scalars = train.epoch_scalars(model, cfg, model.host_init(cfg.model), 0)
    epoch_in = train.place_epoch_inputs(
        partitioner, model.epoch_inputs(data.model, cfg.model, s.epoch_key, 0), s.options)

    def loss(params, frozen, epoch_in, scalars):
        return model.loss(s.net, params, s.state.carry, batch, frozen, epoch_in, scalars,
                          jax.random.PRNGKey(1))[0]

    step = jax.jit(jax.value_and_grad(loss))
    args = (s.state.params, s.frozen, epoch_in, train.device_scalars(scalars))
    value, grads = step(*args)
    return step.lower(*args).as_text(), value, grads


def first_steps_by_dtype(point, data) -> dict:
    """{'float32': first_step, 'bfloat16': first_step} of `point(matmul_dtype=d)` (`point`
    builds a point config from model overrides), after checking that 'float32' is the program,
    loss and gradients of the config without the field, bit for bit, with no bfloat16 in it."""
    without = point()
    del without.model['matmul_dtype']
    runs = {d: first_step(point(matmul_dtype=d), data) for d in ('float32', 'bfloat16')}
    program, value, grads = first_step(without, data)
    assert runs['float32'][0] == program and 'bf16' not in program
    assert float(runs['float32'][1]) == float(value)
    jax.tree.map(np.testing.assert_array_equal, runs['float32'][2], grads)
    return runs


def assert_close_not_equal(want: tuple, got: tuple, leaf_rtol: float = 0.1,
                           total_rtol: float = 2e-2) -> None:
    """bfloat16 against float32: the (loss, gradients) of one batch.

    Each input and weight rounded to bfloat16 (8-bit significand) is off by at most 2^-9 = 2e-3
    relative; products of two bfloat16 numbers are exact in float32 and summed in float32, so a
    product's output is off by ~2^-8 relative to the size of its terms, whatever the reduction
    length. The loss, a mean over the batch of smooth functions of those outputs, moves by less
    than that (rtol 4e-3). A gradient sees the rounding twice more (the cotangent is rounded
    too, and the forward error propagates), and leaky_relu changes slope where a pre-activation
    within rounding of 0 changes sign: all gradients together within `total_rtol` (norm-wise,
    2e-2 by default), each
    leaf within `leaf_rtol` of its norm (measured: at most 4e-2, the first layers')."""
    (value, grads), (value_bf, grads_bf) = want, got
    np.testing.assert_allclose(float(value_bf), float(value), rtol=4e-3)
    leaves, leaves_bf = jax.tree.leaves(grads), jax.tree.leaves(grads_bf)
    assert all(x.dtype == jnp.float32 for x in leaves_bf)
    norm = lambda x: float(np.linalg.norm(np.asarray(x, np.float64)))
    errors = [norm(np.asarray(a, np.float64) - np.asarray(b)) for a, b in zip(leaves, leaves_bf)]
    assert np.linalg.norm(errors) <= total_rtol * np.linalg.norm([norm(a) for a in leaves])
    for a, error in zip(leaves, errors):
        assert error <= leaf_rtol * norm(a)
    assert float(value_bf) != float(value)  # the option does something


def assert_training_close(point, data, workdir, epochs: int = 3, loss_rtol: float = 1e-2,
                          metric_atol: float = 0.02) -> None:
    """`epochs` epochs of the points `point('float32')` and `point('bfloat16')` through the
    trainer: every epoch's loss within `loss_rtol` and every valid/test metric within
    `metric_atol`, and not the same numbers."""
    runs = {}
    for dtype in ('float32', 'bfloat16'):
        cfg = point(dtype)
        cfg.train.epochs, cfg.train.stopping_step = epochs, 10
        runs[dtype] = train.train_and_evaluate(cfg, data, workdir / dtype)['history']
    losses = {d: [h['loss'] for h in r] for d, r in runs.items()}
    np.testing.assert_allclose(losses['bfloat16'], losses['float32'], rtol=loss_rtol)
    assert losses['bfloat16'] != losses['float32']
    for want, got in zip(runs['float32'], runs['bfloat16']):
        for split in ('valid', 'test'):
            for metric, value in want[split].items():
                assert abs(got[split][metric] - value) <= metric_atol, (split, metric)


def assert_matmul_dtype_checks(config_checks, whole, n_users: int, n_items: int) -> None:
    """A model's `config_checks` on the config `whole` (a point's, with its defaults) name
    `model.matmul_dtype` for an unknown dtype and `model.cpu_dot` for bfloat16 with Eigen dots
    (Eigen's bfloat16 GEMM is slow), and pass otherwise. `whole` is changed."""
    m = whole.model
    failing = lambda: [f for ok, f, _ in config_checks(whole, n_users, n_items) if not ok]
    assert (m.matmul_dtype, m.cpu_dot) == ('float32', 'xla') and failing() == []
    m.matmul_dtype = 'float16'
    assert failing() == ['model.matmul_dtype']
    m.matmul_dtype, m.cpu_dot = 'bfloat16', 'eigen'
    assert failing() == ['model.cpu_dot']
    m.cpu_dot = 'xla'
    assert failing() == []
