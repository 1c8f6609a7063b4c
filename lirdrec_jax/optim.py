"""Optimiser and learning-rate schedule."""
import optax


def create_optimizer(weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Adam without the learning rate (the train step scales by the epoch's rate).

    PyTorch's Adam(weight_decay=wd) adds wd * param to the gradient before the moments; this
    chain does the same. The reference lists `weight_decay` in its grid but never passes it to
    its optimiser, so its runs all have wd = 0; our default is 0 for the same numbers.
    Adam's constants are PyTorch's (b1=0.9, b2=0.999, eps=1e-8 added after the square root).
    """
    parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    return optax.chain(*parts, optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8))


def learning_rate_at(epoch: int, learning_rate: float, factor: float, every: float) -> float:
    """The reference's LambdaLR schedule: lr * factor ** (epoch / every), epoch 0-based."""
    return learning_rate * factor ** (epoch / every)
