"""LIRDRec configurations: the embedded synthetic default and the MMRec datasets.

Run (from any folder once the package is installed):
  python -m lirdrec_jax.main --config lirdrec
      Embedded synthetic data (generated on first use, no download), the reference's
      hyper-parameters at one grid point. Trains to early stopping (109 epochs) in about 55 s
      on 2 CPU cores and prints the valid/test table at the best valid epoch next to a
      most-popular baseline: test Recall@20 about 0.47 against 0.15.
  python -m lirdrec_jax.main --config lirdrec:baby --config.data.data_dir=/data/mmrec
      MMRec's Amazon Baby (expects /data/mmrec/baby/baby.inter, image_feat.npy, text_feat.npy)
      over the reference's grid of 54 points (see `hyper_parameters`); prints one line per point
      and the best point by valid Recall@20. Likewise `:sports`, `:clothing`, `:elec`,
      `:microlens`.
  Any single grid point: give one value, e.g. --config.model.n_ui_layers=3
  --config.model.mm_image_weight=0.1 --config.model.reg_weight=0.001 --config.model.decay_weight=0.9

Fields listed in `hyper_parameters` may hold several values (a tuple); the run covers their
product. The reference's grid also lists weight_decay (0, 1e-6, 1e-5), but its trainer never
passes weight_decay to the optimiser, so those runs are identical; we leave it out of the grid
(optim.weight_decay stays 0.0, and a non-zero value does apply PyTorch-style L2 in Adam).
"""
import ml_collections

from lirdrec_jax import config_defaults

MMREC_DATASETS = config_defaults.MMREC_DATASETS


def base_config() -> ml_collections.ConfigDict:
    """The reference's settings (MMRec overall.yaml + LIRDRec.yaml)."""
    c = config_defaults.base('lirdrec', learning_rate=0.0001)
    c.model.embedding_size = 64
    c.model.knn_k = 10
    c.model.n_ui_layers = (2,)
    c.model.n_mm_layers = 1
    c.model.mm_image_weight = (0.1,)
    c.model.reg_weight = (0.001,)
    c.model.dropout = 0.0           # degree-sensitive edge dropout ratio (0 in the reference)
    c.model.decay_base = 0.9        # PWC: w1 <- w1 * decay_base**epoch each epoch
    c.model.decay_weight = (0.9,)   # PWC: initial w1 (w2 = 1 - w1)
    # Speed options (docs/performance.md). The defaults reproduce the published numbers of this
    # project bit for bit. On a CPU, the `fast` variant (lirdrec:fast or lirdrec:baby,fast)
    # sets graph.spmm_impl='segment_sum', model.transposed_features=True and
    # model.cpu_dot='eigen': an epoch about 1.3x faster, results changed only by float32
    # rounding. 'bfloat16' runs the towers' first layers in bfloat16 with float32 accumulation
    # (faster still; metrics move slightly; needs cpu_dot='xla').
    c.model.matmul_dtype = 'float32'
    c.model.transposed_features = False  # transposed feature copies for the towers' weight gradients
    c.model.cpu_dot = 'xla'         # XLA:CPU GEMM kernels of the training step: 'xla' (its choice) or 'eigen'
    c.eval.embeddings = 'last_batch'  # 'last_batch' (reference) or 'fresh'
    return c


def cpu_fast(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CPU speed options (docs/performance.md): same model, float32 rounding differences."""
    c = config_defaults.cpu_fast(c)
    c.model.transposed_features = True
    c.model.cpu_dot = 'eigen'
    return c


def get_config(arg: str = 'synthetic') -> ml_collections.ConfigDict:
    """`arg`: a dataset variant (synthetic, baby, ...), optionally followed by ',fast' for the
    CPU speed options; 'fast' alone is the synthetic default with them."""
    return config_defaults.with_variant(arg, _dataset_config, cpu_fast)


def _dataset_config(arg: str) -> ml_collections.ConfigDict:
    c = base_config()
    if arg == 'synthetic':
        # The reference's settings at one point of its grid; on the embedded data this early-stops
        # after about 110 epochs (best near epoch 88) in about a minute on 2 CPU cores.
        return c
    config_defaults.check_variant(arg)
    c.data.dataset = arg
    # The reference's grid (LIRDRec.yaml), seed last as its configurator appends it.
    c.model.n_ui_layers = (2, 3, 4)
    c.model.mm_image_weight = (0.1, 0.2)
    c.model.reg_weight = (0.01, 0.001, 0.0001)
    c.optim.learning_rate = (0.0001,)
    c.model.decay_weight = (0.9, 0.95, 0.99)
    c.train.seed = (999,)
    c.hyper_parameters = ('model.n_ui_layers', 'model.mm_image_weight', 'model.reg_weight',
                          'optim.learning_rate', 'model.decay_weight', 'train.seed')
    return c
