"""A tiny, CPU-fast configuration for tests: a few epochs on a small synthetic dataset.

  python -m lirdrec_jax.main --config test --config.data.data_dir=DIR
"""
import ml_collections

from lirdrec_jax.configs import lirdrec


def get_config(arg: str = '') -> ml_collections.ConfigDict:
    del arg
    c = lirdrec.base_config()
    c.model.embedding_size = 16
    c.model.knn_k = 5
    c.optim.learning_rate = (0.005,)
    c.train.epochs = 4
    c.train.stopping_step = 2
    c.train.batch_size = 256
    c.eval.batch_size = 128
    c.checkpoint.keep_last = 2
    return c
