"""Building blocks shared by the models, initialised like their PyTorch counterparts.

Matching the reference's initial distributions matters for training dynamics: with the same
learning rate and schedule, a different init scale trains to different numbers.
"""
import functools
from typing import Callable, Optional

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


def check_matmul_dtype(dtype: str) -> None:
    """ValueError naming `model.matmul_dtype` unless `dtype` is one of MATMUL_DTYPES."""
    if dtype not in MATMUL_DTYPES:
        raise ValueError(f'config field model.matmul_dtype = {dtype!r}; expected one of '
                         f'{MATMUL_DTYPES}')


def matmul_dtype_checks(model_cfg) -> list:
    """The config checks of `model.matmul_dtype` for a model's `config_checks` (the same rule
    as LIRDRec's): a known dtype, and no bfloat16 with Eigen dots (`model.cpu_dot='eigen'`),
    whose bfloat16 GEMM is several times slower than XLA's default kernels on the CPU."""
    dtype = model_cfg.get('matmul_dtype', 'float32')
    return [
        (dtype in MATMUL_DTYPES, 'model.matmul_dtype', f'one of {MATMUL_DTYPES}'),
        (not (model_cfg.get('cpu_dot', 'xla') == 'eigen' and dtype == 'bfloat16'),
         'model.cpu_dot', "'xla' with model.matmul_dtype='bfloat16' (Eigen has no fast "
         "bfloat16 GEMM: LIRDRec's towers ran 3.5x slower)"),
    ]


def matmul_input_dtype(matmul_dtype: str):
    """The dtype a model stores a frozen matmul input in: float32, or bfloat16 (the input is
    then rounded once, outside the step, and takes half the memory)."""
    check_matmul_dtype(matmul_dtype)
    return jnp.bfloat16 if matmul_dtype == 'bfloat16' else jnp.float32


def mixed_matmul(x: jax.Array, kernel: jax.Array, dtype: str) -> jax.Array:
    """x @ kernel in `dtype` ('float32' or 'bfloat16'): (..., d) @ (d, h) -> (..., h) float32.

    'float32' is the plain product `x @ kernel` (the program of a model without the option).
    'bfloat16' rounds both operands to bfloat16 and accumulates the products in float32
    (`preferred_element_type`), in the forward pass and in both gradients (`bfloat16_matmul`).
    """
    check_matmul_dtype(dtype)
    if dtype == 'float32':
        return x @ kernel
    return bfloat16_matmul(x, kernel, jnp.dtype(x.dtype).name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bfloat16_matmul(x: jax.Array, kernel: jax.Array, x_dtype: str) -> jax.Array:
    """(..., d) @ (d, h) with bfloat16 operands and float32 accumulation; float32 result.

    The gradients are computed the same way from the cotangent rounded to bfloat16: the
    kernel's as x^T g (contracting every leading axis of x), x's as g kernel^T (returned in
    `x_dtype`, x's dtype; unused and compiled away when x is a constant input). The forward
    pass keeps the bfloat16 copies of x and the kernel for the backward pass, half the bytes of
    float32 ones. (Without the custom gradient, autodiff would multiply the float32 cotangent
    with a bfloat16 operand: a float32 product.)
    """
    del x_dtype
    return jnp.matmul(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16),
                      preferred_element_type=jnp.float32)


def _bfloat16_matmul_fwd(x, kernel, x_dtype):
    xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    return jnp.matmul(xb, kb, preferred_element_type=jnp.float32), (xb, kb)


def _bfloat16_matmul_bwd(x_dtype, residuals, g):
    xb, kb = residuals
    gb = g.astype(jnp.bfloat16)
    grad_x = jnp.matmul(gb, kb.T, preferred_element_type=jnp.float32).astype(x_dtype)
    lead = tuple(range(xb.ndim - 1))
    grad_kernel = jax.lax.dot_general(xb, gb, ((lead, lead), ((), ())),
                                      preferred_element_type=jnp.float32)
    return grad_x, grad_kernel


bfloat16_matmul.defvjp(_bfloat16_matmul_fwd, _bfloat16_matmul_bwd)


class TorchDense(nn.Module):
    """A Dense layer with nn.Linear's initialisation (or `kernel_init`).

    Called with `x_t` (x's transposed copy), x is treated as a constant input and the product
    goes through `frozen_input_matmul` in `matmul_dtype`; without it, `mixed_matmul` in
    `matmul_dtype` (with 'float32' the plain `x @ kernel`).
    """
    features: int
    use_bias: bool = True
    matmul_dtype: str = 'float32'
    kernel_init: Callable = torch_linear_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array, x_t: Optional[jax.Array] = None) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param('kernel', self.kernel_init, (fan_in, self.features))
        if x_t is None:
            y = mixed_matmul(x, kernel, self.matmul_dtype)
        else:
            y = frozen_input_matmul(x, x_t, kernel, self.matmul_dtype)
        if self.use_bias:
            y = y + self.param('bias', torch_linear_bias_init(fan_in), (self.features,))
        return y


class Tower(nn.Module):
    """Linear(d -> 4*dim) -> leaky_relu -> Linear(4*dim -> dim, no bias): one modality encoder.

    Maps (n_items, d) frozen features to (n_items, dim) item representations. `x_t` (the
    features transposed) selects the frozen-input product of the first layer (`TorchDense`);
    `matmul_dtype` is the first layer's (the second is float32).
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
