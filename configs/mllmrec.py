"""MLLMRec configurations: the embedded synthetic default and the MMRec datasets.

Run (from any folder once the package is installed):
  python -m lirdrec_jax.main --config mllmrec
      Embedded synthetic data (generated on first use, no download), with its no-LLM input
      files (items: the text-feature rows; users: the mean of those over each user's TRAINING
      items), at the reference's Baby point: knn_jac 10, pure 0.7 (see `_dataset_config`).
      Prints the valid/test table at the best valid epoch. Measured: early stopping after 81
      epochs (best epoch 59), 57 s wall on 2 CPU cores; valid Recall@20 0.4533, test
      Recall@20 0.4370 and NDCG@20 0.2469 against 0.1489 and 0.0722 for most-popular.
  python -m lirdrec_jax.main --config mllmrec:baby --config.data.data_dir=/data/mmrec
      MMRec's Amazon Baby: expects /data/mmrec/baby/baby.inter and the two input files,
      image_text_feat.npy (one row per item) and user_preferences_feat.npy (one row per user),
      built by `python -m data_prep.mllmrec --data_dir /data/mmrec --dataset baby` (no-LLM
      stand-ins by default; docs/data_prep.md). Likewise `:sports`, `:clothing`, `:elec`,
      `:microlens`.
  Any single point: e.g. --config.model.knn_jac=15 --config.model.pure=0.6

Fields listed in `hyper_parameters` may hold several values (a tuple); the run covers their
product. The reference's yaml grid (MLLMRec.yaml: hyper_parameters feat_embed_dim, knn_jac,
pure) holds ONE value of each per dataset, so every variant here is a single point; its
comments list the values its authors searched (knn_jac 5, 10, 15, 20; pure 0.4 to 0.7). knn_k,
knn_jac, pure and n_ii_layers change only the values of the frozen item inputs, so with
--config.sweep.mode=vmapped points differing in them train side by side. The reference's
trainer passes weight_decay 0.0 to Adam and its learning-rate factor is 1.0 (a constant rate);
its `n_ui_layers: 2` sizes a user-item propagation that its forward never runs, so there is no
such field here.
"""
import ml_collections

from lirdrec_jax import config_defaults

MMREC_DATASETS = config_defaults.MMREC_DATASETS

# (knn_jac, pure) per dataset: the reference's MLLMRec.yaml (Baby active, Sports and Clothing in
# commented blocks). Elec and MicroLens have no reference setting: ours are knn_jac 10 (the
# reference's value on two of its three datasets) and pure 0.6 (the median of its three
# choices, inside the range it searched). Neither was tuned.
DATASET_POINTS = {'baby': (10, 0.7), 'sports': (10, 0.4), 'clothing': (15, 0.6),
                  'elec': (10, 0.6), 'microlens': (10, 0.6)}


def base_config() -> ml_collections.ConfigDict:
    """The reference's settings (its overall.yaml + MLLMRec.yaml), at the Baby point."""
    c = config_defaults.base('mllmrec', learning_rate=0.001)
    # The two input files, in the dataset folder (base.Model.input_files).
    c.data.image_text_file = 'image_text_feat.npy'        # one row per item: F
    c.data.user_profile_file = 'user_preferences_feat.npy'  # one row per user: P
    c.model.feat_embed_dim = (64,)  # output width of both MLPs (hidden: 4x)
    c.model.knn_k = 10              # cosine neighbours per item in B (self included)
    c.model.knn_jac = (10,)         # Jaccard neighbours per item in J
    c.model.pure = (0.7,)           # a cosine neighbour is an edge of B when its similarity >= pure
    c.model.n_ii_layers = 1         # e = sum_{l=0..n_ii_layers} S^l F
    c.model.matmul_dtype = 'float32'  # or 'bfloat16': both MLPs' first layers, f32 accumulation
    c.model.cpu_dot = 'xla'         # XLA:CPU GEMM kernels of the training step: 'xla' or 'eigen'
    c.hyper_parameters = ('model.feat_embed_dim', 'model.knn_jac', 'model.pure', 'train.seed')
    return c


def get_config(arg: str = 'synthetic') -> ml_collections.ConfigDict:
    """`arg`: a dataset variant (synthetic, baby, sports, clothing, elec, microlens), optionally
    followed by ',fast' for the CPU speed options (config_defaults.cpu_fast)."""
    return config_defaults.with_variant(arg, _dataset_config)


def _dataset_config(arg: str) -> ml_collections.ConfigDict:
    c = base_config()
    if arg == 'synthetic':
        # The reference's default (Baby) point, chosen before measuring: the embedded data has
        # Baby's shape at a smaller scale, and the reference ships this point uncommented.
        # On these inputs no cosine neighbour reaches 0.7 (the synthetic text rows' nearest
        # neighbours sit near 0.15-0.2), so B is the identity and J carries the graph.
        # Measured: 81 epochs (best 59), test Recall@20 0.4370, NDCG@20 0.2469 (most-popular
        # 0.1489, 0.0722).
        return c
    config_defaults.check_variant(arg)
    c.data.dataset = arg
    knn_jac, pure = DATASET_POINTS[arg]
    c.model.knn_jac = (knn_jac,)
    c.model.pure = (pure,)
    return c
