"""Building blocks shared by the models, initialised like their PyTorch counterparts.

Matching the reference's initial distributions matters for training dynamics: with the same
learning rate and schedule, a different init scale trains to different numbers.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

MATMUL_DTYPES = ('float32', 'bfloat16')


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def frozen_input_matmul(x: jax.Array, x_t: jax.Array, kernel: jax.Array,
                        dtype: str) -> jax.Array:
    """x @ kernel for a constant x (frozen features), float32 result.

    The kernel's gradient is computed as `x_t @ g` from a stored transposed copy x_t = x.T:
    XLA:CPU contracts x's leading axis (x.T @ g) about 1.8x slower than a pre-transposed
    operand. With dtype 'bfloat16', x and x_t are stored in bfloat16, the kernel and the
    gradient are rounded to bfloat16 and products are accumulated in float32. No gradient
    flows to x.

    Args:
      x: (n, d) features, float32 or bfloat16.
      x_t: (d, n) the same values transposed (same dtype).
      kernel: (d, h) float32.
      dtype: 'float32' or 'bfloat16' (static).
    """
    return jnp.matmul(x, kernel.astype(dtype), preferred_element_type=jnp.float32)


def _frozen_input_matmul_fwd(x, x_t, kernel, dtype):
    return frozen_input_matmul(x, x_t, kernel, dtype), x_t


def _frozen_input_matmul_bwd(dtype, x_t, g):
    return None, None, jnp.matmul(x_t, g.astype(dtype), preferred_element_type=jnp.float32)


frozen_input_matmul.defvjp(_frozen_input_matmul_fwd, _frozen_input_matmul_bwd)


class TorchDense(nn.Module):
    """A Dense layer with nn.Linear's initialisation.

    Called with `x_t` (x's transposed copy), x is treated as a constant input and the product
    goes through `frozen_input_matmul` in `matmul_dtype`; without it, a plain float32 `x @ kernel`.
    """
    features: int
    use_bias: bool = True
    matmul_dtype: str = 'float32'

    @nn.compact
    def __call__(self, x: jax.Array, x_t: Optional[jax.Array] = None) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param('kernel', torch_linear_kernel_init, (fan_in, self.features))
        if x_t is None:
            y = x @ kernel
        else:
            y = frozen_input_matmul(x, x_t, kernel, self.matmul_dtype)
        if self.use_bias:
            y = y + self.param('bias', torch_linear_bias_init(fan_in), (self.features,))
        return y


class Tower(nn.Module):
    """Linear(d -> 4*dim) -> leaky_relu -> Linear(4*dim -> dim, no bias): one modality encoder.

    Maps (n_items, d) frozen features to (n_items, dim) item representations. `x_t` (the
    features transposed) selects the frozen-input product of the first layer (`TorchDense`).
    """
    dim: int
    matmul_dtype: str = 'float32'

    @nn.compact
    def __call__(self, x: jax.Array, x_t: Optional[jax.Array] = None) -> jax.Array:
        hidden = TorchDense(4 * self.dim, matmul_dtype=self.matmul_dtype, name='hidden')(x, x_t)
        hidden = nn.leaky_relu(hidden, negative_slope=0.01)
        return TorchDense(self.dim, use_bias=False, name='out')(hidden)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Row-wise x / max(||x||_2, eps), as torch.nn.functional.normalize."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)
