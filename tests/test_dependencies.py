"""The dependency runs one way: `data_prep` and `configs` may import `lirdrec_jax`, never the
reverse (the package must work from an installed wheel, where the configs are
`lirdrec_jax.configs`, and without import cycles)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import lirdrec_jax

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(lirdrec_jax.__file__).parent
FORBIDDEN = ('data_prep', 'configs')
# Entry-point scripts that define the same absl flags as lirdrec_jax.main: the static check
# reads them, the dynamic one cannot import them into the same process as main.
SCRIPTS = ('lirdrec_jax.parity.__main__',)


def module_name(path: Path) -> str:
    """lirdrec_jax/models/__init__.py -> lirdrec_jax.models."""
    parts = ('lirdrec_jax',) + path.relative_to(PACKAGE_DIR).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def package_files():
    """(module name, path) of every module of lirdrec_jax (found on disk, without importing
    anything)."""
    return [(module_name(p), p) for p in sorted(PACKAGE_DIR.rglob('*.py'))]


def package_modules():
    """The modules that can be imported side by side (every one but the SCRIPTS)."""
    return sorted(m for m, _ in package_files() if m not in SCRIPTS)


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + '.') for f in FORBIDDEN)


def test_the_module_list_covers_the_package():
    modules = package_modules()
    for expected in ('lirdrec_jax.data', 'lirdrec_jax.mmrec_files', 'lirdrec_jax.synthetic',
                     'lirdrec_jax.experiment', 'lirdrec_jax.train', 'lirdrec_jax.models.lirdrec',
                     'lirdrec_jax.bench', 'lirdrec_jax.parity.lirdrec'):
        assert expected in modules


def test_no_import_statement_names_data_prep_or_configs():
    """Static: also catches imports inside functions, which importing the module does not run."""
    offenders = []
    for _, path in package_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [f'{path.relative_to(REPO)}:{node.lineno}: {n}' for n in names
                          if _forbidden(n)]
    assert offenders == []


def test_importing_the_package_loads_neither_data_prep_nor_configs():
    """Dynamic: importing every module (from the repository root, where both folders could be
    found) leaves no module named data_prep* or configs* in sys.modules."""
    code = ('import importlib, json, sys\n'
            f'for name in {package_modules()!r}:\n'
            '    importlib.import_module(name)\n'
            f'bad = [m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r}]\n'
            'print(json.dumps(sorted(bad)))\n')
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
