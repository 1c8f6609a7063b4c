"""`python -m lirdrec_jax.parity --reference PATH --config configs/<model>.py[:variant] [...]`

Builds the PyTorch reference from the user's own checkout of the model's reference repository
(enoche/LIRDRec for LIRDRec, enoche/FREEDOM for FREEDOM, ...) and ours on the same data,
copies the reference's initial weights into ours, and prints, for every checked quantity, the
max absolute and relative difference, the tolerance and PASS/FAIL. Exit status 1 if any check
fails. The checks are the model's own (its parity module, `lirdrec_jax/parity/<model>.py`,
named by the model's `parity` hook). See docs/parity.md for what is checked and why the
tolerances are what they are.

With a grid config, the point given by --point (default 0, the first) is checked.

With --full, nothing is copied between the sides: each trains to early stopping with its own
random streams (the reference as its quick_start runs it, ours as lirdrec_jax.main does) for
--seeds seeds (--seed, --seed + 1, ...), and their final valid/test metrics are compared within
seed noise (lirdrec_jax/parity/full.py). Exit status 1 if a headline metric differs beyond it.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lirdrec_jax.cli import default_config_path

_CONFIG = config_flags.DEFINE_config_file('config', default_config_path(),
                                          'Config file, optionally with :variant.')
_REFERENCE = flags.DEFINE_string('reference', None,
                                  "Path of a clone of the model's reference repository.")
_EPOCHS = flags.DEFINE_integer('epochs', 3, 'Epochs to train both sides on identical batches.')
_POINT = flags.DEFINE_integer('point', 0, 'Index of the grid point to check.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the reference initialisation and the batches '
                             '(--full: the first seed).')
_FULL = flags.DEFINE_bool('full', False, 'Train both sides to early stopping, each with its own '
                          'random streams, and compare their final metrics within seed noise.')
_SEEDS = flags.DEFINE_integer('seeds', 3, '--full: seeds per side.')


def dataset_folder(data_cfg):
    """(<data_dir>/<dataset> folder, dataset) of the configured data (the embedded default is
    generated on first use)."""
    if not data_cfg.data_dir:
        from lirdrec_jax import synthetic
        data_dir, name = synthetic.ensure_default_dataset()
        return os.path.join(data_dir, name)
    return os.path.join(data_cfg.data_dir, data_cfg.dataset)


def main(argv):
    if len(argv) > 1:
        sys.exit(f'error: unexpected arguments {argv[1:]} (every option is a --flag)')
    from lirdrec_jax import models
    try:
        model = models.get_model(_CONFIG.value.model_name)
    except ValueError as err:
        sys.exit(f'error: {err}')
    if model.parity is None:
        sys.exit(f'error: model {model.name!r} has no parity module')
    if not _REFERENCE.value:
        sys.exit(f'error: --reference PATH (a clone of {model.parity.reference_repo}) is '
                 'required')
    logging.set_verbosity(logging.WARNING)
    import importlib
    import torch
    from lirdrec_jax import experiment, grid
    from lirdrec_jax.parity import checks, reference
    run = importlib.import_module(model.parity.module)
    torch.set_num_threads(os.cpu_count() or 1)
    points = grid.expand_grid(_CONFIG.value)
    if not 0 <= _POINT.value < len(points):
        sys.exit(f'error: --point {_POINT.value}: the config has {len(points)} grid points '
                 f'(0 to {len(points) - 1})')
    point = points[_POINT.value]
    print(f'grid point {point.index}: ' + ', '.join(f'{k}={v}' for k, v in point.values.items()))
    try:
        side = run.reference_side(_REFERENCE.value)
    except reference.ReferenceError_ as err:
        sys.exit(f'error: {err}')
    dataset = experiment.load_dataset(_CONFIG.value.data, model.input_files)
    if _FULL.value:
        from lirdrec_jax.parity import full
        if _SEEDS.value < 2:
            sys.exit(f'error: --seeds {_SEEDS.value}: --full needs at least 2 seeds per side '
                     '(the verdict compares with the seed-to-seed spread)')
        seeds = [_SEED.value + i for i in range(_SEEDS.value)]
        try:
            outcome = full.run_for_model(run, side, point.config, dataset,
                                         dataset_folder(_CONFIG.value.data), seeds)
        except NotImplementedError as err:
            sys.exit(f'error: {err}')
        print(full.report(outcome))
        sys.exit(0 if outcome.passed else 1)
    results = run.run_parity(side, point.config, dataset, dataset_folder(_CONFIG.value.data),
                             epochs=_EPOCHS.value, seed=_SEED.value)
    print(checks.report(results))
    sys.exit(0 if all(c.passed for c in results) else 1)


if __name__ == '__main__':
    from lirdrec_jax.cli import apply_aliases, precheck
    # config_flags reads the overrides from sys.argv itself, so the rewrite goes there.
    sys.argv[:] = apply_aliases(sys.argv)
    precheck(sys.argv)
    app.run(main)
