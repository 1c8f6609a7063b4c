"""Command-line helpers shared by `lirdrec_jax.main`, `lirdrec_jax.parity` and
`lirdrec_jax.bench`: built-in configs by name (`--config lirdrec:baby`), `--workdir`, and a
clear error for config keys that do not exist, before absl parses the overrides (it would raise
a KeyError traceback). No flags are defined here."""
import importlib
import importlib.resources
import importlib.util
import os
import sys
from pathlib import Path

# Short spellings accepted on the command line, rewritten before parsing.
# `--config.data_dir=/data/mmrec` is how the project's docs first wrote the data path.
OVERRIDE_ALIASES = {'--config.data_dir': '--config.data.data_dir'}


DEFAULT_CONFIG = 'lirdrec'


CONFIGS_PACKAGE = 'lirdrec_jax.configs'


def _installed_configs():
    return importlib.import_module(CONFIGS_PACKAGE)


def configs_package():
    """The package of the built-in configs, `lirdrec_jax.configs`: the repository's configs/
    folder as an install maps it (setup.cfg package_dir), or, where `lirdrec_jax` is imported
    from a source checkout instead of the install (Python started in the repository's root after
    a non-editable `pip install .`), the checkout's own configs/ registered under that name."""
    try:
        return _installed_configs()
    except ModuleNotFoundError as err:
        if err.name != CONFIGS_PACKAGE:
            raise
    folder = Path(__file__).resolve().parent.parent / 'configs'
    if not (folder / '__init__.py').is_file():
        raise SystemExit(f'error: the built-in configs ({CONFIGS_PACKAGE}) are not installed: '
                         'reinstall the package (pip install .)')
    spec = importlib.util.spec_from_file_location(CONFIGS_PACKAGE, folder / '__init__.py',
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[CONFIGS_PACKAGE] = module
    spec.loader.exec_module(module)
    setattr(sys.modules['lirdrec_jax'], 'configs', module)
    return module


def builtin_configs() -> dict:
    """{name: path} of the configs installed with the package (the repository's configs/
    folder, installed as `lirdrec_jax.configs`, `configs_package`)."""
    folder = importlib.resources.files(configs_package())
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir()
            if entry.name.endswith('.py') and not entry.name.startswith('_')}


def resolve_config(spec: str) -> str:
    """The `file.py[:variant]` that `spec` names: an existing file as given; otherwise a
    built-in config by name (`lirdrec`, `lirdrec:baby`, `freedom:sports,fast`), also when
    written as the repository path `configs/<name>.py` from another folder. A spec that is
    neither exits with one error line listing the built-in names."""
    file_part, sep, variant = spec.partition(':')
    if os.path.isfile(file_part):
        return spec
    builtin = builtin_configs()
    name = file_part
    if Path(file_part).suffix == '.py' and Path(file_part).parent.name == 'configs':
        name = Path(file_part).stem
    if name in builtin:
        return str(builtin[name]) + sep + variant
    raise SystemExit(f'error: --config {spec!r}: no such file, and {file_part!r} is not a '
                     f'built-in config; built-in: {", ".join(sorted(builtin))} (e.g. '
                     '--config lirdrec:baby), or the path of your own config file')


def default_config_path() -> str:
    """The path absl's config flag defaults to: the built-in LIRDRec config."""
    return resolve_config(DEFAULT_CONFIG)


def apply_aliases(argv: list) -> list:
    """argv with the config spec resolved to a file (`resolve_config`), `--workdir DIR` turned
    into its config field (`--config.checkpoint.output_dir=DIR`), and aliased override keys
    rewritten (`--config.data_dir=X` -> `--config.data.data_dir=X`)."""
    out, args = [argv[0]], list(argv[1:])
    while args:
        arg = args.pop(0)
        key, sep, value = arg.partition('=')
        if key in ('--config', '--workdir') and not sep:
            if not args:
                raise SystemExit(f'error: {key} needs a value')
            value, sep = args.pop(0), '='
        if key == '--config':
            out.append('--config=' + resolve_config(value))
        elif key == '--workdir':
            out.extend(workdir_overrides(value))
        elif key in OVERRIDE_ALIASES:
            out.append(OVERRIDE_ALIASES[key] + sep + value)
        else:
            out.append(arg)
    return out


def workdir_overrides(workdir: str) -> list:
    """`--workdir DIR` as in the Flax examples: DIR is the run directory itself (config,
    checkpoints, metrics, curves, results), and starting again with the same DIR continues the
    run from its checkpoints (a config that differs is refused, see experiment.py)."""
    path = Path(workdir).expanduser()
    if not path.name or path.name in ('.', '..'):
        path = path.resolve()
    return [f'--config.checkpoint.output_dir={path.parent}',
            f'--config.checkpoint.run_name={path.name}', '--config.resume=True']


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
    return default_config_path()


def load_config(spec: str):
    """The config of `spec` (a built-in name or `file.py`, optionally with `:variant`; see
    `resolve_config`): its file's `get_config(variant)`, as absl's config_flags would load it.
    An unknown name or a variant that `get_config` rejects (a ValueError naming the valid ones)
    exits with one error line, before absl loads the file and shows a traceback."""
    file_part, _, variant = resolve_config(spec).partition(':')
    loader = importlib.util.spec_from_file_location('_lirdrec_jax_config_file', file_part)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    try:
        return module.get_config(variant) if variant else module.get_config()
    except ValueError as err:
        raise SystemExit(f'error: config {spec!r}: {err}') from None


def precheck(argv) -> None:
    """Load the config file once before absl parses the overrides, to report bad keys clearly."""
    config = load_config(_config_path(argv))
    try:
        check_override_keys(config, argv)
    except ConfigKeyError as err:
        raise SystemExit(f'error: {err}')
