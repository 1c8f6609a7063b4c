"""The model interface: what a model module provides to the generic trainer, sweep, benchmark
and parity driver.

A model is one module under `lirdrec_jax/models/` that ends with `MODEL = Model(...)`, built
from plain functions over explicit state (nothing is stashed on modules), and one line in the
registry (`lirdrec_jax/models/__init__.py`). The generic code calls these functions and
nothing else of the model; it never names a model.

The pieces of state, and who owns them:
- `params`: the trainable pytree (Adam updates it).
- `carry`: a device pytree that one step hands to the next and that checkpoints save, e.g.
  LIRDRec's fusion attention of the last batch and the embeddings of the last forward (which
  the reference evaluates on). Models without one use `()`.
- `host`: a JSON-able dict of the model's host-side state (saved in every checkpoint), e.g.
  LIRDRec's PWC weights w1/w2, a KL-annealing counter.
- `scalars`: a dict of float32 scalars of one epoch (from the host state and the config),
  passed into the compiled step as arrays so that changing them never recompiles; a vmapped
  sweep stacks them per point. The trainer adds `learning_rate` itself.
- `frozen`: the point's frozen inputs on the devices (feature views, the kNN item graph, the
  full normalised adjacency), placed once by `place_frozen`.
- `epoch_inputs`: inputs redrawn every epoch on the host (an edge-pruned graph, ...), or
  `None`. Every array leaf is replicated on the devices; sparse matrices (BCOO) are converted
  to the run's sparse-product operand first (`graph.spmm_operand`).

Batches: `batch_kind` names the sampler that feeds the model (`sampling.BATCH_KINDS`): the
trainer draws an epoch of batches of that kind and never looks inside them.

Extra input files: a model that reads more than MMRec's files (e.g. MLLMRec's LLM-derived item
and user matrices) declares them in `input_files`, each an `InputFile` naming the config's
`data.<field>` that holds the file name. `experiment.load_dataset` reads and validates them
next to the dataset's other files and hands them to the model as `dataset.extra[field]`.
"""
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

# (ok, 'section.field', 'what was expected'): one check of a config value.
ConfigCheck = Tuple[bool, str, str]


class ProblemSize(NamedTuple):
    """The sizes an analytic FLOP count needs (`Model.flops_per_batch`).

    Attributes:
      n_users, n_items: the dataset's counts.
      n_train: training interactions (rows of the `.inter` file with x_label 0).
      batch_size: rows per training batch.
      feature_dims: the widths of the item feature tables, image first ((4096, 384)).
      input_dims: the widths of the model's extra input files, in `Model.input_files` order
        (e.g. DGVAE's word count); () when unknown.
    """
    n_users: int
    n_items: int
    n_train: int
    batch_size: int
    feature_dims: Tuple[int, ...]
    input_dims: Tuple[int, ...] = ()


class InputFile(NamedTuple):
    """One extra file a model reads from the dataset folder (`Model.input_files`).

    Attributes:
      field: the field of the config's `data` section that holds the file name, e.g.
        'image_text_file'; the file is `<data_dir>/<dataset>/<data.<field>>` and reaches the
        model as `dataset.extra[field]`.
      rows: 'items' or 'users': one row per item (n_items rows) or per user (n_users rows).
      build: the command line that builds the file, shown when it is missing; '{data_dir}' and
        '{dataset}' in it are replaced by the configured ones.
      kind: what the file holds and what the model receives (`model_inputs.INPUT_KINDS`):
        'dense': a `.npy` array (numpy.save), loaded as a (rows, d) float32 ndarray; item rows
          must be non-zero (they feed cosine kNN graphs);
        'sparse': a scipy sparse matrix saved with `scipy.sparse.save_npz` (`.npz`, any of
          scipy's formats), loaded as a (rows, d) float32 `scipy.sparse.csr_matrix` with sorted
          indices and no duplicate entries (e.g. DGVAE's per-user word TF-IDF,
          `lirdrec_jax.word_view`); rows may be zero.
        Both are checked to have the dataset's row count, d >= 1 and finite values.
    """
    field: str
    rows: str
    build: str
    kind: str = 'dense'


class ParityHooks(NamedTuple):
    """What the parity driver needs of a model (see `lirdrec_jax/parity/`).

    Attributes:
      module: the model's parity module (`lirdrec_jax.parity.<name>`), imported lazily by the
        driver, because it needs torch.
      reference_repo: the GitHub repository of the reference ('enoche/LIRDRec').
    """
    module: str
    reference_repo: str


class Model(NamedTuple):
    """A model of the family, as the generic code sees it.

    Attributes:
      name: its registry key (`config.model_name`).
      batch_kind: the sampler that feeds it (`sampling.BATCH_KINDS`), e.g. 'bpr'.
      sweep_fields: 'model.<field>' names that a vmapped sweep may vary between points (they
        must reach the step only through `scalars` or the values of `frozen`).
      config_checks: `(cfg, n_users, n_items) -> [ConfigCheck]`: every check of the point's
        config that is the model's business (its `model` section, and the meaning it gives to
        generic fields such as `eval.embeddings`) and needs no data beyond the counts.
      static_key: `(model_cfg) -> str`: what else must agree for points to share one compiled
        program besides the non-swept fields (e.g. which modalities a graph has entries for).
      prepare: `(dataset) -> prepared`: host-side work shared by every point of a dataset
        (feature views, adjacency, and what per-epoch sampling draws from, such as the
        training edges and their weights: `epoch_inputs` receives `prepared`).
      frozen_inputs: `(prepared, dataset, model_cfg) -> host pytree`: a point's frozen inputs
        (e.g. its kNN item graph).
      place_frozen: `(frozen, partitioner, options) -> device pytree`; it may drop host-only
        leaves that only `init` reads (e.g. tables that become parameters).
      create: `(model_cfg, n_users, n_items, layout) -> net`: the static, hashable description
        of the computation (a Flax module, or a NamedTuple of sizes for plain functions).
        `layout` is `Partitioner.layout_hook()`.
      init: `(key, net, frozen, host_frozen) -> (params, carry)`; `host_frozen` is the
        unplaced pytree (for parameters initialised from data).
      host_init: `(model_cfg) -> host`.
      epoch_schedule: `(model_cfg, host, epoch) -> (host, scalars)`: the start of epoch
        `epoch` (0-based) on the host.
      epoch_inputs: `(prepared, model_cfg, key, epoch) -> pytree or None`: inputs redrawn for
        the epoch (`key` is the point's, folded with the epoch).
      start_epoch: `(params, carry) -> (params, carry)`: the start of an epoch on the device
        (pure; e.g. LIRDRec's theta overwrite).
      loss: `(net, params, carry, batch, frozen, epoch_inputs, scalars, rng) -> (loss, carry)`:
        the training loss of one batch and the carry for the next step. `rng` is a fresh key
        per step (for models that draw noise in their forward pass).
      eval_embeddings: `(net, params, carry, frozen, epoch_inputs, scalars, eval_mode) ->
        (users (n_users, d), items (n_items, d))`: what full-sort evaluation scores with;
        `eval_mode` is the config's `eval.embeddings` ('last_batch' when absent), which a model
        may ignore. With a `score` function, users and items are whatever pytrees it reads
        (every user leaf has n_users rows).
      flops_per_batch: optional `(model_cfg, size: ProblemSize) -> float`: the analytic FLOP
        count of one training step (the benchmark's floor).
      parity: optional `ParityHooks`.
      input_files: the extra files the model reads (`InputFile`), loaded into
        `dataset.extra` by `experiment.load_dataset`; () for models that read only MMRec's.
      score: optional `(user rows, items) -> (b, n_items)` float32 scores for models whose
        ranking is not the dot product of a user and an item vector (e.g. DGVAE's mixture over
        K factors, log sum_k c_ik exp(z_uk . e_i / tau)): `user rows` are the batch's rows of
        every leaf of `eval_embeddings`' users, `items` its items unchanged. None: the dot
        product `users @ items.T` (`evaluation.dot_scores`). A module-level function (it keys
        a compilation cache).
    """
    name: str
    batch_kind: str
    sweep_fields: Sequence[str]
    config_checks: Callable[..., list]
    static_key: Callable[[Any], str]
    prepare: Callable
    frozen_inputs: Callable
    place_frozen: Callable
    create: Callable
    init: Callable
    host_init: Callable
    epoch_schedule: Callable
    epoch_inputs: Callable
    start_epoch: Callable
    loss: Callable
    eval_embeddings: Callable
    flops_per_batch: Optional[Callable] = None
    parity: Optional[ParityHooks] = None
    input_files: Sequence[InputFile] = ()
    score: Optional[Callable] = None


def no_epoch_inputs(prepared, model_cfg, key, epoch):
    """For models whose inputs never change between epochs."""
    del prepared, model_cfg, key, epoch
    return None


def keep_state(params, carry):
    """For models with nothing to do on the device at the start of an epoch."""
    return params, carry


def no_static_key(model_cfg) -> str:
    del model_cfg
    return ''
