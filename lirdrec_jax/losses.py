"""Training objectives."""
import jax
import jax.numpy as jnp


def bpr_loss(users: jax.Array, positives: jax.Array, negatives: jax.Array,
             weights: jax.Array) -> jax.Array:
    """Bayesian personalised ranking: mean over rows of -log sigmoid(<u,p> - <u,n>).

    Args:
      users, positives, negatives: (batch, d) gathered representations.
      weights: (batch,) 1 for real rows, 0 for padding rows of the last batch, so that a padded
        batch gives exactly the mean over its real rows.
    """
    margin = jnp.sum(users * positives, axis=1) - jnp.sum(users * negatives, axis=1)
    return -jnp.sum(weights * jax.nn.log_sigmoid(margin)) / jnp.sum(weights)


def embedding_l2(user_emb: jax.Array, item_emb: jax.Array) -> jax.Array:
    """mean(U^2) + mean(I^2) over the full user and item matrices (the reference's reg term)."""
    return jnp.mean(user_emb ** 2) + jnp.mean(item_emb ** 2)
