"""Command line: `python -m lirdrec_jax.main --config configs/lirdrec.py[:variant] [--config.a.b=v ...]`.

The config file's `get_config(variant)` returns a locked ml_collections config; fields are
overridden with `--config.section.field=value`. A key that does not exist is an error that
names it and lists the fields of its section.
"""
import importlib.util
import os
import sys

from absl import app, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/lirdrec.py',
                                          'Config file, optionally with :variant.')


class ConfigKeyError(KeyError):
    def __str__(self):
        return self.args[0]


def check_override_keys(config, argv) -> None:
    """Raise ConfigKeyError for any --config.x.y=... whose key is not a field of `config`."""
    for arg in argv[1:]:
        if not arg.startswith('--config.'):
            continue
        dotted = arg[len('--config.'):].split('=', 1)[0]
        node, path = config, []
        for part in dotted.split('.'):
            fields = sorted(node.keys()) if hasattr(node, 'keys') else []
            if part not in fields:
                where = '.'.join(path) or 'the top level'
                raise ConfigKeyError(
                    f'unknown config key {dotted!r} (from {arg!r}): {where} has no field '
                    f'{part!r}; its fields are: {", ".join(fields) or "none"}')
            node, path = node[part], path + [part]


def _config_path(argv) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith('--config='):
            return arg.split('=', 1)[1]
        if arg == '--config' and i + 1 < len(argv):
            return argv[i + 1]
    return 'configs/lirdrec.py'


def _precheck(argv) -> None:
    """Load the config file once before absl parses the overrides, to report bad keys clearly."""
    path = _config_path(argv)
    file_part, _, variant = path.partition(':')
    if not os.path.isfile(file_part):
        raise SystemExit(f'error: config file {file_part!r} not found (run from the repository '
                         'root, e.g. --config configs/lirdrec.py:baby)')
    spec = importlib.util.spec_from_file_location('_lirdrec_jax_config_precheck', file_part)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant) if variant else module.get_config()
    try:
        check_override_keys(config, argv)
    except ConfigKeyError as err:
        raise SystemExit(f'error: {err}')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    # Orbax logs every save step at INFO through absl; progress lines are ours.
    logging.set_verbosity(logging.WARNING)
    from lirdrec_jax import experiment  # heavy imports after flag parsing
    experiment.run(_CONFIG.value)


def run() -> None:
    _precheck(sys.argv)
    app.run(main)


if __name__ == '__main__':
    run()
