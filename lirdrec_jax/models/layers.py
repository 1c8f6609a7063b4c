"""Building blocks shared by the models, initialised like their PyTorch counterparts.

Matching the reference's initial distributions matters for training dynamics: with the same
learning rate and schedule, a different init scale trains to different numbers.
"""
import jax
import jax.numpy as jnp
from flax import linen as nn


def torch_linear_kernel_init(key, shape, dtype=jnp.float32):
    """nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    PyTorch uses kaiming_uniform with a=sqrt(5), whose bound reduces to 1/sqrt(fan_in).
    Flax kernels are (fan_in, fan_out), the transpose of PyTorch's weight.
    """
    bound = 1.0 / jnp.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_linear_bias_init(fan_in: int):
    """nn.Linear's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / jnp.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def xavier_normal_init(key, shape, dtype=jnp.float32):
    """torch.nn.init.xavier_normal_ (gain 1): N(0, 2/(fan_in+fan_out)), not truncated.

    (jax.nn.initializers.glorot_normal truncates, so it is not used.)
    """
    std = jnp.sqrt(2.0 / (shape[0] + shape[1]))
    return std * jax.random.normal(key, shape, dtype)


class TorchDense(nn.Module):
    """A Dense layer with nn.Linear's initialisation."""
    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param('kernel', torch_linear_kernel_init, (fan_in, self.features))
        y = x @ kernel
        if self.use_bias:
            y = y + self.param('bias', torch_linear_bias_init(fan_in), (self.features,))
        return y


class Tower(nn.Module):
    """Linear(d -> 4*dim) -> leaky_relu -> Linear(4*dim -> dim, no bias): one modality encoder.

    Maps (n_items, d) frozen features to (n_items, dim) item representations.
    """
    dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = nn.leaky_relu(TorchDense(4 * self.dim, name='hidden')(x), negative_slope=0.01)
        return TorchDense(self.dim, use_bias=False, name='out')(hidden)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Row-wise x / max(||x||_2, eps), as torch.nn.functional.normalize."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)
