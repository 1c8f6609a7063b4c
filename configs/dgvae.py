"""DGVAE configurations: the embedded synthetic default and the MMRec datasets.

Run (from any folder once the package is installed):
  python -m lirdrec_jax.main --config dgvae
      Embedded synthetic data (generated on first use, with its word view; no download) at the
      reference's settings (run-baby.sh, see `base_config`). Prints the valid/test table at the
      best valid epoch next to a most-popular baseline (test Recall@20 0.1489, NDCG@20 0.0722).
  python -m lirdrec_jax.main --config dgvae:baby --config.data.data_dir=/data/mmrec
      MMRec's Amazon Baby (expects /data/mmrec/baby/baby.inter, image_feat.npy, text_feat.npy
      and the word view user_words_tfidf.npz, built by
      `python -m data_prep.words --data_dir /data/mmrec --dataset baby` from the items' texts).
      Likewise `:sports`, `:clothing`, `:elec`, `:microlens`.

The reference (enoche/DGVAE) runs its own pipeline, not MMRec's: one point, no grid. Its early
stopping counts 20 evaluations without a better valid Recall@20 and then stops; ours stops when
the count exceeds `train.stopping_step`, hence 19. Metrics are MMRec's (every model of this
project); `eval.recall_denominator = 'min_k_test_items'` gives the reference's own Recall
(hits / min(k, held-out items)).
"""
import ml_collections

from lirdrec_jax import config_defaults, word_view

MMREC_DATASETS = config_defaults.MMREC_DATASETS


def base_config() -> ml_collections.ConfigDict:
    """The reference's settings (run-baby.sh and code/main.py's defaults)."""
    c = config_defaults.base('dgvae', learning_rate=0.001)
    c.data.words_file = word_view.WORDS_FILE  # the word view (data_prep.words)
    c.model.num_prototypes = 3          # K disentangled factors (-ncl 3)
    c.model.embedding_size = 64         # d (-dim); the encoder is one Linear(n -> 2d) (-l unused)
    c.model.dropout = 0.5               # on the encoders' inputs (-dr)
    c.model.tau = 0.1                   # temperature of assignments and decoders (-tau)
    c.model.std = 0.075                 # reparameterisation noise std, CF view (-std)
    c.model.text_std = 0.075            # ... text view (-tstd)
    c.model.rating_anneal_cap = 0.2     # KL weight = min(cap, step / total steps) (-ranneal)
    c.model.text_anneal_cap = 0.2       # (-tanneal)
    c.model.rating_total_anneal_steps = 20000  # (-rtast)
    c.model.text_total_anneal_steps = 20000    # (-ttast)
    c.model.lambda_text = 0.2           # weight of the text VAE's loss (-ldr_text)
    c.model.lambda_reg = 0.4            # weight of the mutual-information term (-ldr_reg)
    c.model.item_reg = 0.0              # reg_loss weights (-reg "0,0": off)
    c.model.prototype_reg = 0.0
    c.model.knn_k = 10                  # kNN item graph of the CF encoder (-knn_k)
    c.model.mm_image_weight = 0.04      # graph = 0.04 image + 0.96 text (-txt_weight 0.96)
    c.model.matmul_dtype = 'float32'    # or 'bfloat16': the encoders' products, f32 accumulation
    c.model.cpu_dot = 'xla'             # XLA:CPU GEMM kernels of the training step
    c.train.epochs = 100                # (-ep 100)
    c.train.batch_size = 512            # users per batch (-bs)
    c.train.stopping_step = 19          # the reference stops at 20 stale evaluations (-es 20)
    c.train.seed = (6,)                 # (-rs 6)
    c.eval.recall_denominator = 'test_items'  # MMRec's; 'min_k_test_items': the reference's
    c.hyper_parameters = ('train.seed',)
    return c


def get_config(arg: str = 'synthetic') -> ml_collections.ConfigDict:
    """`arg`: a dataset variant (synthetic, baby, sports, clothing, elec, microlens), optionally
    followed by ',fast' (accepted as for every model; DGVAE's graph product does not use
    `graph.spmm_impl`, so it changes nothing)."""
    return config_defaults.with_variant(arg, _dataset_config)


def _dataset_config(arg: str) -> ml_collections.ConfigDict:
    c = base_config()
    if arg == 'synthetic':
        return c
    config_defaults.check_variant(arg)
    c.data.dataset = arg
    return c
