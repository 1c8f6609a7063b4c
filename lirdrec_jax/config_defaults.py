"""The config sections every model shares: data, optim, train, eval, graph, parallel, sweep,
checkpoint. Each model's config file (configs/<model>.py) starts from `base(model_name, lr)`
and adds its `model` section and what its reference sets differently."""
from typing import Callable

import ml_collections

MMREC_DATASETS = ('baby', 'sports', 'clothing', 'elec', 'microlens')


def base(model_name: str, learning_rate: float) -> ml_collections.ConfigDict:
    """MMRec's overall.yaml settings. Fields a grid may sweep hold tuples (one value here), so
    that any of them can be given several values from the command line, e.g.
    --config.optim.learning_rate="(0.001,0.0001)" with a `hyper_parameters` that names it."""
    c = ml_collections.ConfigDict()
    c.model_name = model_name

    c.data = ml_collections.ConfigDict()
    c.data.dataset = 'synthetic'
    c.data.data_dir = ''            # folder holding <dataset>/<dataset>.inter; '' = embedded data
    c.data.image_file = 'image_feat.npy'
    c.data.text_file = 'text_feat.npy'
    c.data.cache_dir = ''           # where the converted arrays go; '' = <data_dir>/<dataset>/.lirdrec_jax_cache

    c.model = ml_collections.ConfigDict()

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = (learning_rate,)
    c.optim.lr_decay_factor = 1.0   # lr * factor ** (epoch / lr_decay_epochs); the reference's [1.0, 50]
    c.optim.lr_decay_epochs = 50.0
    c.optim.weight_decay = 0.0      # the references' trainers never pass one to Adam

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 1000
    c.train.batch_size = 2048
    c.train.stopping_step = 20
    c.train.eval_step = 1
    c.train.seed = (999,)
    c.train.scan_epoch = True       # an epoch's batches in one compiled lax.scan (False: one dispatch per batch)

    c.eval = ml_collections.ConfigDict()
    c.eval.metrics = ('recall', 'ndcg', 'precision', 'map')
    c.eval.topk = (5, 10, 20, 50)
    c.eval.valid_metric = 'recall@20'
    c.eval.batch_size = 512         # users per device and dispatch; results do not depend on it
    c.eval.recall_denominator = 'test_items'  # Recall@k / |test items| (MMRec); 'min_k_test_items': / min(k, |test items|)

    c.graph = ml_collections.ConfigDict()
    c.graph.spmm_impl = 'bcoo'      # 'bcoo' (jax.experimental.sparse) or 'segment_sum' (chunked)
    c.graph.spmm_chunk_size = -1    # segment_sum: entries per chunk; -1 = 4096 on CPU, one chunk on GPU/TPU

    c.parallel = ml_collections.ConfigDict()
    c.parallel.num_devices = 0      # 0 = every device (of every process)
    c.parallel.shard_items = True   # split item-indexed inputs (e.g. LIRDRec's features) over devices
    c.parallel.distributed = 'auto'  # jax.distributed.initialize(): 'auto', 'on', 'off'

    c.sweep = ml_collections.ConfigDict()
    c.sweep.mode = 'sequential'     # 'vmapped': grid points that differ only in numeric values train side by side
    c.sweep.max_points = 0          # at most this many points per vmapped group (0 = no limit)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.output_dir = 'checkpoints'
    c.checkpoint.run_name = ''      # '' = <model>-<dataset>-<timestamp> (resume: the latest such)
    c.checkpoint.keep_last = 2
    c.checkpoint.tensorboard = True  # TensorBoard event files per point (lirdrec_jax/curves.py)
    c.resume = False

    c.hyper_parameters = ('train.seed',)
    return c


def cpu_fast(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CPU speed options every model shares (docs/performance.md): the chunked
    segment-sum sparse product for its graphs (a model without such graphs is unchanged)."""
    c.graph.spmm_impl = 'segment_sum'
    return c


def with_variant(arg: str, dataset_config: Callable[[str], ml_collections.ConfigDict],
                 fast: Callable = cpu_fast) -> ml_collections.ConfigDict:
    """The config of a variant `dataset[,fast]` ('' = synthetic; 'fast' alone = synthetic with
    the CPU speed options): `dataset_config(dataset)`, then `fast` applied when asked.
    ValueError naming the valid variants otherwise."""
    parts = [p for p in (arg or 'synthetic').split(',') if p]
    names = [p for p in parts if p != 'fast'] or ['synthetic']
    if len(names) != 1:
        raise ValueError(f'config variant {arg!r}: expected one dataset, optionally with ",fast"')
    try:
        c = dataset_config(names[0])
    except ValueError as err:
        raise ValueError(f'{err} (each optionally followed by ",fast")') from None
    return fast(c) if 'fast' in parts else c


def check_variant(arg: str) -> None:
    """ValueError naming `arg` and the valid dataset variants unless it is one of them
    (`lirdrec_jax.cli.load_config` turns it into one error line)."""
    if arg != 'synthetic' and arg not in MMREC_DATASETS:
        raise ValueError(f'unknown config variant {arg!r}; expected one of '
                         f'synthetic, {", ".join(MMREC_DATASETS)}')
