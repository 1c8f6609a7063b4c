"""Optimiser and learning-rate schedule."""
import jax
import jax.numpy as jnp
import optax


def create_optimizer(weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Adam without the learning rate (the train step scales by the epoch's rate).

    PyTorch's Adam(weight_decay=wd) adds wd * param to the gradient before the moments; this
    chain does the same. The reference lists `weight_decay` in its grid but never passes it to
    its optimiser, so its runs all have wd = 0; our default is 0 for the same numbers.
    Adam's constants are PyTorch's (b1=0.9, b2=0.999, eps=1e-8 added after the square root).
    """
    parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    return optax.chain(*parts, scale_by_torch_adam(b1=0.9, b2=0.999, eps=1e-8))


def bias_correction(decay: float, count: jax.Array) -> jax.Array:
    """1 - decay**count in float32, accurate to rounding: -expm1(count * log1p(-(1 - decay))),
    with 1 - decay taken in double precision. (float32(0.999)**t has the relative error of
    0.999's rounding times t, which 1 - 0.999**t turns into 1.3e-5 for t up to thousands.)"""
    return -jnp.expm1(count.astype(jnp.float32) * jnp.log1p(jnp.float32(-(1.0 - decay))))


def scale_by_torch_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's step direction as torch.optim.Adam computes it: optax.scale_by_adam with the
    bias corrections of `bias_correction`.

    optax computes 1 - b**t with b rounded to float32, so with b2 = 0.999 its bias-corrected
    second moment is 1.3e-5 too large and every step 6.4e-6 too short, the same sign at every
    step for thousands of steps; PyTorch computes the corrections in double precision. A
    systematic difference that a training trajectory accumulates (CM3's parity measured it).
    The state is optax's ScaleByAdamState, so checkpoints keep their layout.
    """
    base = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_int32_increment(state.count)
        c1, c2 = bias_correction(b1, count), bias_correction(b2, count)
        updates = jax.tree.map(lambda m, v: (m / c1.astype(m.dtype))
                               / (jnp.sqrt(v / c2.astype(v.dtype)) + eps), mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(base.init, update_fn)


def learning_rate_at(epoch: int, learning_rate: float, factor: float, every: float) -> float:
    """The reference's LambdaLR schedule: lr * factor ** (epoch / every), epoch 0-based."""
    return learning_rate * factor ** (epoch / every)
