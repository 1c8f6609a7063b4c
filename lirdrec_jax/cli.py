"""Command-line helpers shared by `lirdrec_jax.main` and `lirdrec_jax.parity`: a clear error for
config keys that do not exist, before absl parses the overrides (it would raise a KeyError
traceback). No flags are defined here."""
import importlib.util
import os

# Short spellings accepted on the command line, rewritten before parsing.
# `--config.data_dir=/data/mmrec` is how the project's docs first wrote the data path.
OVERRIDE_ALIASES = {'--config.data_dir': '--config.data.data_dir'}


def apply_aliases(argv: list) -> list:
    """argv with aliased override keys rewritten (`--config.data_dir=X` -> `--config.data.data_dir=X`)."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition('=')
        out.append(OVERRIDE_ALIASES.get(key, key) + sep + value if key in OVERRIDE_ALIASES
                   else arg)
    return out


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


def load_config(path: str):
    """The config of `file.py[:variant]` (its `get_config(variant)`), as absl's config_flags
    would load it; a missing file or a variant that `get_config` rejects (a ValueError naming
    the valid ones) exits with one error line, before absl loads the file and shows a
    traceback."""
    file_part, _, variant = path.partition(':')
    if not os.path.isfile(file_part):
        raise SystemExit(f'error: config file {file_part!r} not found (run from the repository '
                         'root, e.g. --config configs/lirdrec.py:baby)')
    spec = importlib.util.spec_from_file_location('_lirdrec_jax_config_file', file_part)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.get_config(variant) if variant else module.get_config()
    except ValueError as err:
        raise SystemExit(f'error: config {path!r}: {err}') from None


def precheck(argv) -> None:
    """Load the config file once before absl parses the overrides, to report bad keys clearly."""
    config = load_config(_config_path(argv))
    try:
        check_override_keys(config, argv)
    except ConfigKeyError as err:
        raise SystemExit(f'error: {err}')
