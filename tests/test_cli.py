"""Built-in configs by name, `--workdir`, and the command-line rewrites of lirdrec_jax.cli."""
from pathlib import Path

import pytest

from lirdrec_jax import cli

REPO = Path(__file__).resolve().parents[1]
BUILTIN = ('cm3', 'dgvae', 'freedom', 'lirdrec', 'mllmrec', 'test')


def test_builtin_configs_are_the_repository_configs():
    found = cli.builtin_configs()
    assert sorted(found) == sorted(BUILTIN)
    for name, path in found.items():
        assert path.read_bytes() == (REPO / 'configs' / f'{name}.py').read_bytes()


def test_a_checkout_shadowing_the_install_still_finds_its_configs(monkeypatch, tmp_path):
    """Python started in the repository's root imports lirdrec_jax from the checkout, where no
    lirdrec_jax/configs exists (an install maps configs/ to it): the checkout's configs/ is
    registered under that name, and a config file importing a built-in one loads."""
    import sys

    def not_installed():
        raise ModuleNotFoundError("No module named 'lirdrec_jax.configs'",
                                  name='lirdrec_jax.configs')

    monkeypatch.setattr(cli, '_installed_configs', not_installed)
    for name in [m for m in sys.modules if m.startswith('lirdrec_jax.configs')]:
        monkeypatch.delitem(sys.modules, name)
    import lirdrec_jax
    monkeypatch.delattr(lirdrec_jax, 'configs', raising=False)
    found = cli.builtin_configs()
    assert sorted(found) == sorted(BUILTIN)
    assert all(path.parent == REPO / 'configs' for path in found.values())
    assert sys.modules['lirdrec_jax.configs'].__path__ == [str(REPO / 'configs')]
    own = tmp_path / 'mine.py'
    own.write_text('from lirdrec_jax.configs import freedom\n\n'
                   'def get_config(arg=""):\n'
                   '    return freedom.get_config(arg or "synthetic")\n')
    assert cli.load_config(f'{own}:baby').data.dataset == 'baby'


@pytest.mark.parametrize('spec, model, dataset', [
    ('lirdrec', 'lirdrec', 'synthetic'), ('lirdrec:baby', 'lirdrec', 'baby'),
    ('freedom:sports', 'freedom', 'sports'), ('configs/cm3.py:clothing', 'cm3', 'clothing'),
    ('dgvae', 'dgvae', 'synthetic')])
def test_configs_load_by_name_from_any_folder(spec, model, dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    cfg = cli.load_config(spec)
    assert (cfg.model_name, cfg.data.dataset) == (model, dataset)


@pytest.mark.parametrize('name', ['lirdrec', 'freedom', 'cm3', 'mllmrec', 'dgvae'])
def test_every_model_takes_the_fast_modifier(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain, fast = cli.load_config(f'{name}:sports'), cli.load_config(f'{name}:sports,fast')
    assert (plain.graph.spmm_impl, fast.graph.spmm_impl) == ('bcoo', 'segment_sum')
    assert fast.data.dataset == 'sports' and cli.load_config(f'{name}:fast').data.dataset == (
        'synthetic')
    # Nothing else differs, except LIRDRec's own CPU options.
    differ = {f'{s}.{k}' for s in plain.keys() if hasattr(plain[s], 'keys')
              for k in plain[s].keys() if plain[s][k] != fast[s][k]}
    expected = {'graph.spmm_impl'} | ({'model.transposed_features', 'model.cpu_dot'}
                                      if name == 'lirdrec' else set())
    assert differ == expected


def test_a_file_in_the_working_folder_wins_over_the_builtin(tmp_path, monkeypatch):
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / 'lirdrec.py').write_text(
        'from lirdrec_jax.configs import lirdrec\n\n'
        'def get_config(arg=""):\n'
        '    c = lirdrec.get_config(arg or "synthetic")\n'
        '    c.train.epochs = 7\n'
        '    return c\n')
    monkeypatch.chdir(tmp_path)
    assert cli.resolve_config('configs/lirdrec.py:baby') == 'configs/lirdrec.py:baby'
    mine = cli.load_config('configs/lirdrec.py:baby')
    assert (mine.train.epochs, mine.data.dataset) == (7, 'baby')
    # By name it is still the built-in one.
    assert cli.load_config('lirdrec').train.epochs == 1000


def test_own_config_file_starting_from_a_builtin(tmp_path):
    own = tmp_path / 'my_freedom.py'
    own.write_text('from lirdrec_jax.configs import freedom\n\n'
                   'def get_config(arg=""):\n'
                   '    c = freedom.get_config(arg or "synthetic")\n'
                   '    c.model.knn_k = 5\n'
                   '    return c\n')
    cfg = cli.load_config(f'{own}:sports')
    assert (cfg.model_name, cfg.data.dataset, cfg.model.knn_k) == ('freedom', 'sports', 5)


def test_unknown_config_names_the_builtin_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.resolve_config('lirdrek:baby')
    message = str(exit_.value.code)
    assert message.startswith("error: --config 'lirdrek:baby'")
    assert all(name in message for name in BUILTIN)
    with pytest.raises(SystemExit) as exit_:
        cli.load_config('lirdrec:bbay')
    assert str(exit_.value.code).startswith("error: config 'lirdrec:bbay'") and 'baby' in str(
        exit_.value.code)


def test_argv_rewrites(tmp_path):
    builtin = cli.builtin_configs()
    argv = ['prog', '--config', 'freedom:sports,fast', '--workdir', str(tmp_path / 'run'),
            '--config.data_dir=/data', '--config.train.epochs=3']
    assert cli.apply_aliases(argv) == [
        'prog', f'--config={builtin["freedom"]}:sports,fast',
        f'--config.checkpoint.output_dir={tmp_path}', '--config.checkpoint.run_name=run',
        '--config.resume=True', '--config.data.data_dir=/data', '--config.train.epochs=3']
    # The `=` spellings, and a trailing slash on the folder.
    assert cli.apply_aliases(['prog', '--config=lirdrec', f'--workdir={tmp_path}/run/'])[1:3] == [
        f'--config={builtin["lirdrec"]}', f'--config.checkpoint.output_dir={tmp_path}']
    with pytest.raises(SystemExit, match='error: --workdir needs a value'):
        cli.apply_aliases(['prog', '--workdir'])
