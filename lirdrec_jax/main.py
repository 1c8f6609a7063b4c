"""Command line: `python -m lirdrec_jax.main --config NAME[:variant] [--workdir DIR] [--config.a.b=v ...]`.

`--config` takes a built-in config by name (lirdrec, freedom, cm3, mllmrec, dgvae, test; with a
variant such as `lirdrec:baby` or `freedom:sports,fast`) or the path of a config file, whose
`get_config(variant)` returns a locked ml_collections config (your own file can start from a
built-in one: `from lirdrec_jax.configs import lirdrec`). Fields are overridden with
`--config.section.field=value`; a key that does not exist is an error that names it and lists
the fields of its section. `--workdir DIR` writes the run into DIR and, started again with the
same DIR, continues it (as in the Flax examples).
"""
import logging as std_logging
import os
import sys

from absl import app, logging
from ml_collections import config_flags

from lirdrec_jax.cli import apply_aliases, default_config_path, precheck

# Errors caused by the user's input or environment; anything else keeps its traceback. OSError
# covers file-system failures (storage.StorageError names the path and the remedy), a run
# directory locked by another process (rundir.RunLockedError) and missing files.
USER_ERRORS = (ValueError, OSError)  # DataError and CheckpointError are ValueErrors

_CONFIG = config_flags.DEFINE_config_file('config', default_config_path(),
                                          'Config file, optionally with :variant.')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    # Orbax logs every save step at INFO through absl; progress lines are ours.
    logging.set_verbosity(logging.WARNING)
    if not os.environ.get('LIRDREC_JAX_TRACEBACK'):
        quiet_storage_noise()
    from lirdrec_jax import experiment  # heavy imports after flag parsing
    try:
        experiment.run(_CONFIG.value)
    except USER_ERRORS as err:
        # Bad input (data files, config values, run directories): the message names the file,
        # line or field; a traceback would only bury it.
        if os.environ.get('LIRDREC_JAX_TRACEBACK'):
            raise
        sys.exit(f'error: {err}\n(set LIRDREC_JAX_TRACEBACK=1 to see the traceback)')


class _DropOrbaxRecords(std_logging.Filter):
    """Orbax logs a failed save (disk full, read-only folder) over many lines before raising;
    the error line that follows names the path and the remedy."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return '/orbax/' not in record.pathname.replace('\\', '/')


def quiet_storage_noise() -> None:
    """Silence orbax's log records, and the 'Event loop is closed' tracebacks and unretrieved
    futures its storage threads leave when a save or restore has failed: they repeat the real
    error, which the one `error:` line reports (LIRDREC_JAX_TRACEBACK=1 shows them all)."""
    # Orbax's storage coroutines whose results nobody reads after the failure ('Future
    # exception was never retrieved'); nothing of ours runs on asyncio.
    std_logging.getLogger('asyncio').setLevel(std_logging.CRITICAL)
    # On the handlers (absl's sits on the root logger), so that records of orbax's modules are
    # dropped whichever logger they were logged through.
    for handler in std_logging.getLogger().handlers + std_logging.getLogger('absl').handlers:
        handler.addFilter(_DropOrbaxRecords())
    default_hook = sys.unraisablehook

    def hook(unraisable):
        if (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == 'Event loop is closed'):
            return
        default_hook(unraisable)
    sys.unraisablehook = hook


def run() -> None:
    # config_flags reads the overrides from sys.argv itself, so the rewrite goes there.
    sys.argv[:] = apply_aliases(sys.argv)
    precheck(sys.argv)
    app.run(main)


if __name__ == '__main__':
    run()
