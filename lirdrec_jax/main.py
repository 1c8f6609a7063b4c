"""Command line: `python -m lirdrec_jax.main --config configs/lirdrec.py[:variant] [--config.a.b=v ...]`.

The config file's `get_config(variant)` returns a locked ml_collections config; fields are
overridden with `--config.section.field=value`. A key that does not exist is an error that
names it and lists the fields of its section.
"""
import os
import sys

from absl import app, logging
from ml_collections import config_flags

from lirdrec_jax.cli import apply_aliases, precheck

# Errors caused by the user's input; anything else keeps its traceback.
USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError)  # DataError is a ValueError

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/lirdrec.py',
                                          'Config file, optionally with :variant.')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    # Orbax logs every save step at INFO through absl; progress lines are ours.
    logging.set_verbosity(logging.WARNING)
    from lirdrec_jax import experiment  # heavy imports after flag parsing
    try:
        experiment.run(_CONFIG.value)
    except USER_ERRORS as err:
        # Bad input (data files, config values, run directories): the message names the file,
        # line or field; a traceback would only bury it.
        if os.environ.get('LIRDREC_JAX_TRACEBACK'):
            raise
        sys.exit(f'error: {err}\n(set LIRDREC_JAX_TRACEBACK=1 to see the traceback)')


def run() -> None:
    # config_flags reads the overrides from sys.argv itself, so the rewrite goes there.
    sys.argv[:] = apply_aliases(sys.argv)
    precheck(sys.argv)
    app.run(main)


if __name__ == '__main__':
    run()
