"""Tests of MLLMRec's input files: `python -m data_prep.mllmrec` (items and user profiles), the
no-LLM builders of `lirdrec_jax.model_inputs`, and how `experiment.load_dataset` reads the
files a model declares, on small dataset folders written here."""
import json
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

from data_prep import mllmrec
from data_prep.encoders import HashingEncoder
from data_prep.pipeline import main_guard
from lirdrec_jax import experiment, model_inputs
from lirdrec_jax.data import DataError, Interactions, MMRecDataset
from lirdrec_jax.models.base import InputFile

ASINS = ['B0000000A1', 'B0000000A2', 'B0000000A3', 'B0000000A4']
USERS = ['U0', 'U1', 'U2', 'U3']
# (user, item, x_label). U0 trains on A1, A2; U1 on A2, A3, A4 (A3 listed twice, as MMRec keeps
# duplicates); U2 on A4. U3 has only a test row: no training interaction (its test row is
# dropped at load, since MMRec cannot rank for it, but it still counts in n_users).
ROWS = [(0, 0, 0), (0, 1, 0), (0, 2, 1), (0, 3, 2),
        (1, 1, 0), (1, 2, 0), (1, 2, 0), (1, 3, 0), (1, 0, 1), (1, 1, 2),
        (2, 3, 0), (2, 0, 1), (2, 2, 2),
        (3, 0, 2)]
TEXT_FEAT = np.array([[1, 0, 0], [0, 2, 0], [0, 0, 4], [2, 2, 2]], dtype=np.float32)
# The user rows worked out by hand: means of TEXT_FEAT over each user's training rows only.
HAND_USERS = np.array([[0.5, 1.0, 0.0],                     # (A1 + A2) / 2
                       [0.5, 1.0, 2.5],                     # (A2 + A3 + A3 + A4) / 4
                       [2.0, 2.0, 2.0],                     # A4
                       [0.0, 0.0, 0.0]], dtype=np.float32)  # no training interaction
ITEM_TEXT = {'B0000000A1': 'cotton baby blanket', 'B0000000A2': 'wooden toy train',
             'B0000000A3': 'soft teddy bear'}                # A4 has no text
DESCRIPTIONS = {'B0000000A1': 'a folded blue blanket', 'B0000000A2': 'a red toy locomotive',
                'B0000000A4': 'a white night lamp'}          # A3 has no description


def write_inter(folder, name, rows):
    (folder / f'{name}.inter').write_text('userID\titemID\trating\ttimestamp\tx_label\n' + ''.join(
        f'{u}\t{i}\t5.0\t{n}\t{x}\n' for n, (u, i, x) in enumerate(rows)))


def write_jsonl(path, records):
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    return path


@pytest.fixture
def shop(tmp_path):
    """A 4-user, 4-item MMRec folder with id maps, text features and item texts."""
    folder = tmp_path / 'data' / 'shop'
    folder.mkdir(parents=True)
    write_inter(folder, 'shop', ROWS)
    (folder / 'i_id_mapping.csv').write_text(
        'asin\titemID\n' + ''.join(f'{a}\t{i}\n' for i, a in enumerate(ASINS)))
    (folder / 'u_id_mapping.csv').write_text(
        'user_id\tuserID\n' + ''.join(f'{u}\t{i}\n' for i, u in enumerate(USERS)))
    np.save(folder / 'text_feat.npy', TEXT_FEAT)
    np.save(folder / 'image_feat.npy', TEXT_FEAT + 1.0)
    write_jsonl(folder / 'item_text.jsonl', [{'item_id': k, 'text': t}
                                             for k, t in ITEM_TEXT.items()])
    return folder


def run(folder, *args, hashing=True):
    argv = ['--data_dir', str(folder.parent), '--dataset', folder.name, '--quiet', *args]
    if hashing:
        argv += ['--encoder', 'hashing', '--hash_dim', '32']
    assert mllmrec.main(argv) == 0
    items = np.load(folder / 'image_text_feat.npy')
    users = np.load(folder / 'user_preferences_feat.npy')
    manifest = json.loads((folder / 'user_preferences_feat.manifest.json').read_text())
    return items, users, manifest


def encode(text):
    return HashingEncoder(32).encode_one(text)


# ----------------------------------------------------------------------------- no-LLM default


def test_default_users_are_means_over_training_items_only(shop, capsys):
    items, users, manifest = run(shop, hashing=False)       # no encoder is loaded at all
    np.testing.assert_array_equal(items, TEXT_FEAT)
    np.testing.assert_allclose(users, HAND_USERS, rtol=0, atol=1e-7)
    assert manifest['counts']['users_without_training_interactions_zero_row'] == 1
    assert 'training interactions' in manifest['rows'] and manifest['encoder'] is None
    assert '1 user(s) have no training interaction' in capsys.readouterr().err
    # Must fail: a mean over every interaction (what leaks valid/test) differs from it.
    leaky = np.zeros_like(HAND_USERS)
    for u in range(4):
        leaky[u] = TEXT_FEAT[[i for v, i, _ in ROWS if v == u]].mean(0)
    assert not np.allclose(leaky, users)


def test_valid_and_test_items_do_not_move_the_user_rows(shop):
    _, users, _ = run(shop, hashing=False)
    # Other valid/test items for every user: the rows stay bit for bit.
    moved = [(u, (i + 1) % 4 if x else i, x) for u, i, x in ROWS]
    write_inter(shop, 'shop', moved)
    _, again, _ = run(shop, '--overwrite', hashing=False)
    np.testing.assert_array_equal(again, users)
    # Must fail: another TRAINING item does move them.
    write_inter(shop, 'shop', [(0, 2, 0)] + ROWS[1:])
    _, changed, _ = run(shop, '--overwrite', hashing=False)
    assert not np.array_equal(changed[0], users[0])
    np.testing.assert_array_equal(changed[1:], users[1:])


def test_builders_match_the_embedded_default_inputs(tmp_path):
    from lirdrec_jax import synthetic
    folder = synthetic.write_synthetic_dataset(tmp_path, 'small', n_users=120, n_items=80,
                                               image_dim=8, text_dim=8)
    ds = experiment.load_dataset(ml_collections.ConfigDict(dict(
        data_dir=str(tmp_path), dataset='small', image_file='image_feat.npy',
        text_file='text_feat.npy', cache_dir='', items_file='image_text_feat.npy',
        users_file='user_preferences_feat.npy')),
        (InputFile('items_file', 'items', 'x'), InputFile('users_file', 'users', 'x')))
    np.testing.assert_array_equal(ds.extra['items_file'], ds.text_feat)
    # An independent restatement: a Python loop over the training rows, in float64.
    sums, counts = np.zeros((ds.n_users, 8)), np.zeros(ds.n_users)
    for u, i in zip(ds.train.users, ds.train.items):
        sums[u] += ds.text_feat[i]
        counts[u] += 1
    np.testing.assert_allclose(ds.extra['users_file'], sums / counts[:, None], rtol=1e-6)
    # The command rebuilds the same bytes from the folder's own files.
    for f in ('image_text_feat.npy', 'user_preferences_feat.npy'):
        (folder / f).rename(folder / f'{f}.embedded')
    run(folder, hashing=False)
    for f in ('image_text_feat.npy', 'user_preferences_feat.npy'):
        assert (folder / f).read_bytes() == (folder / f'{f}.embedded').read_bytes()


def test_in_memory_stand_ins_for_the_benchmark():
    ds = MMRecDataset('m', 4, 4, Interactions(*(np.array([u for u, _, x in ROWS if x == 0]),
                                                np.array([i for _, i, x in ROWS if x == 0]))),
                      Interactions(np.zeros(0, np.int32), np.zeros(0, np.int32)),
                      Interactions(np.zeros(0, np.int32), np.zeros(0, np.int32)),
                      None, TEXT_FEAT)
    out = model_inputs.with_no_llm_inputs(ds, (InputFile('a', 'items', ''),
                                               InputFile('b', 'users', '')))
    np.testing.assert_array_equal(out.extra['a'], TEXT_FEAT)
    np.testing.assert_allclose(out.extra['b'], HAND_USERS, atol=1e-7)
    assert ds.extra == {} and model_inputs.with_no_llm_inputs(ds, ()) is ds


# ----------------------------------------------------------------------------- items


def test_descriptions_are_joined_with_the_item_text_in_that_order(shop, tmp_path):
    desc = write_jsonl(tmp_path / 'captions.jsonl', [{'asin': k, 'text': t}
                                                     for k, t in DESCRIPTIONS.items()])
    inputs, counts = mllmrec.build_item_inputs(ASINS, DESCRIPTIONS, ITEM_TEXT)
    assert inputs == ['a folded blue blanket cotton baby blanket',
                      'a red toy locomotive wooden toy train', 'soft teddy bear',
                      'a white night lamp']
    assert counts == {'items_description_and_text': 2, 'items_description_only': 1,
                      'items_text_only': 1, 'items_neither_mean_filled': 0}
    items, _, _ = run(shop, '--descriptions', str(desc))
    expected = np.stack([encode(t) for t in inputs])
    np.testing.assert_allclose(items, expected, rtol=1e-6)
    # Must fail: the other order gives other rows (the hashing encoder sees word pairs).
    swapped = encode(f'{ITEM_TEXT["B0000000A1"]} {DESCRIPTIONS["B0000000A1"]}')
    assert not np.allclose(items[0], swapped)
    manifest = json.loads((shop / 'image_text_feat.manifest.json').read_text())
    assert manifest['modes']['items'] == 'descriptions'
    assert manifest['encoder'] == {'name': 'hashing', 'dim': 32}


def test_items_text_needs_text_features_and_descriptions_need_item_texts(shop, tmp_path,
                                                                          capsys):
    (shop / 'text_feat.npy').unlink()
    argv = ['--data_dir', str(shop.parent), '--dataset', 'shop', '--quiet']
    assert main_guard(mllmrec.main, argv) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'text_feat.npy does not exist; --items text' in err
    (shop / 'item_text.jsonl').unlink()
    desc = write_jsonl(tmp_path / 'd.jsonl', [{'asin': 'B0000000A1', 'text': 'x'}])
    assert main_guard(mllmrec.main, argv + ['--descriptions', str(desc)]) == 1
    assert 'item_text.jsonl does not exist' in capsys.readouterr().err


# ----------------------------------------------------------------------------- user profiles

PROFILES = {0: 'likes blankets and trains', 1: 'buys toys for toddlers', 2: 'wants a lamp'}


def expected_profile_rows(texts):
    """Hashing rows of users 0-2 given {user: text}; the mean of them for users 0-2 without
    one; user 3 (no training interaction) zero."""
    rows = np.zeros((4, 32), dtype=np.float32)
    have = [u for u in range(3) if u in texts]
    for u in have:
        rows[u] = encode(texts[u])
    for u in set(range(3)) - set(have):
        rows[u] = rows[have].astype(np.float64).mean(0)
    return rows


def test_profiles_file_by_mapped_or_raw_id(shop, tmp_path):
    path = write_jsonl(tmp_path / 'p.jsonl', [
        {'userID': 0, 'text': PROFILES[0]}, {'user_id': 'U1', 'text': PROFILES[1]},
        {'userID': 3, 'text': 'built from test items: ignored'}])
    _, users, manifest = run(shop, '--profiles_file', str(path))
    np.testing.assert_allclose(users, expected_profile_rows({0: PROFILES[0], 1: PROFILES[1]}),
                               rtol=1e-6)
    counts = manifest['counts']
    assert counts['users_without_profile_mean_filled'] == 1                 # user 2
    assert counts['profiles_of_users_without_training_items_ignored'] == 1  # user 3
    assert manifest['modes']['profiles'] == 'text'


def test_profiles_file_errors_name_file_line_and_field(shop, tmp_path, capsys):
    argv = ['--data_dir', str(shop.parent), '--dataset', 'shop', '--quiet', '--encoder',
            'hashing', '--profiles_file']
    cases = [('{"userID": 0, "text": "a"}\n{"user_id": "U9", "text": "b"}\n',
              r"p.jsonl, line 2: field user_id is 'U9'; expected a raw user id of "
              r"u_id_mapping.csv"),
             ('{"userID": 7, "text": "a"}\n', 'line 1: field userID is 7; expected a mapped '
                                              'user id in 0..3'),
             ('{"userID": 0, "text": 5}\n', 'line 1: field text is 5; expected a string'),
             ('{"userID": 0, "text": "a"\n', 'line 1: not a JSON object')]
    for text, message in cases:
        (tmp_path / 'p.jsonl').write_text(text)
        assert main_guard(mllmrec.main, argv + [str(tmp_path / 'p.jsonl')]) == 1
        err = capsys.readouterr().err
        assert err.startswith('error: ') and message in err, err
    # With --skip_malformed the bad line is counted and the rest is used.
    (tmp_path / 'p.jsonl').write_text(cases[0][0])
    _, users, manifest = run(shop, '--profiles_file', str(tmp_path / 'p.jsonl'),
                             '--skip_malformed')
    assert manifest['malformed_lines']['p.jsonl']['skipped'] == 1
    np.testing.assert_allclose(users, expected_profile_rows({0: 'a'}), rtol=1e-6)


# The fake LLM: the profile lists the texts of the items it was shown, and can fail on a user.
FAKE_LLM = textwrap.dedent('''\
    import json, sys
    record = json.load(sys.stdin)
    if len(sys.argv) > 1 and sys.argv[1] in ('all', record['user_id']):
        print('model crashed', file=sys.stderr)
        sys.exit(3)
    print('likes ' + ' and '.join(i['text'] or i['item_id'] for i in record['items']))
''')


def command_profiles():
    """What FAKE_LLM writes for users 0-2 (training items only; A4 has no text)."""
    return {0: 'likes cotton baby blanket and wooden toy train',
            1: 'likes wooden toy train and soft teddy bear and soft teddy bear and B0000000A4',
            2: 'likes B0000000A4'}


def test_profile_command_sees_training_items_only_and_resumes(shop, tmp_path):
    script = tmp_path / 'fake_llm.py'
    script.write_text(FAKE_LLM)
    cmd = f'{sys.executable} {script}'
    _, users, manifest = run(shop, '--profile_cmd', cmd)
    np.testing.assert_allclose(users, expected_profile_rows(command_profiles()), rtol=1e-6)
    assert manifest['counts']['profiles_produced'] == 3
    saved = [json.loads(x) for x in
             (shop / 'user_preferences_feat.profiles.jsonl').read_text().splitlines()]
    assert saved[0] == {'userID': 0, 'user_id': 'U0', 'text': command_profiles()[0]}
    # Must fail: had the test item A4 of user 0 been shown, its profile would differ.
    assert 'B0000000A4' not in saved[0]['text']
    # A rerun reuses the saved profiles: a command that now fails is never called.
    _, again, manifest = run(shop, '--profile_cmd', cmd + ' all', '--overwrite')
    np.testing.assert_array_equal(again, users)
    assert (manifest['counts']['profiles_reused'], manifest['counts']['profiles_produced']) \
        == (3, 0)
    # An interrupted run (the last profile lost) continues with the missing user only.
    path = shop / 'user_preferences_feat.profiles.jsonl'
    path.write_text(''.join(x + '\n' for x in path.read_text().splitlines()[:2]))
    _, again, manifest = run(shop, '--profile_cmd', cmd + ' U0', '--overwrite')
    np.testing.assert_array_equal(again, users)
    assert (manifest['counts']['profiles_reused'], manifest['counts']['profiles_produced']) \
        == (2, 1)


def test_profile_command_failures_stop_or_are_skipped(shop, tmp_path):
    script = tmp_path / 'fake_llm.py'
    script.write_text(FAKE_LLM)
    cmd = f'{sys.executable} {script} U1'
    save = ['--save_profiles', str(tmp_path / 'p.jsonl')]
    with pytest.raises(DataError, match=r"--profile_cmd failed on user 1 \('U1'\): exit status "
                                        r"3.*--on_profile_error skip"):
        run(shop, '--profile_cmd', cmd, *save)
    _, users, manifest = run(shop, '--profile_cmd', cmd, '--on_profile_error', 'skip', *save)
    assert manifest['counts']['profile_failures'] == 1
    profiles = command_profiles()
    del profiles[1]
    np.testing.assert_allclose(users, expected_profile_rows(profiles), rtol=1e-6)


def test_profile_callable(shop, tmp_path, monkeypatch):
    (tmp_path / 'my_llm.py').write_text(textwrap.dedent('''\
        def profile(record):
            return f"user {record['user_id']} bought {len(record['items'])} items"
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    _, users, _ = run(shop, '--profile_callable', 'my_llm:profile')
    np.testing.assert_allclose(users, expected_profile_rows(
        {0: 'user U0 bought 2 items', 1: 'user U1 bought 4 items', 2: 'user U2 bought 1 items'}),
        rtol=1e-6)
    with pytest.raises(DataError, match='--profile_callable .*expected module:function'):
        run(shop, '--profile_callable', 'my_llm', '--overwrite')
    with pytest.raises(DataError, match='needs exactly one of --profiles_file, --profile_cmd'):
        run(shop, '--profile_callable', 'my_llm:profile', '--profiles_file', 'x', '--overwrite')
    with pytest.raises(DataError, match='--profiles mean does not use --profile_callable'):
        run(shop, '--profiles', 'mean', '--profile_callable', 'my_llm:profile', '--overwrite')


# ----------------------------------------------------------------------------- loading


def test_load_dataset_names_the_missing_file_its_field_and_the_command(shop):
    build = 'python -m data_prep.mllmrec --data_dir {data_dir} --dataset {dataset}'
    files = (InputFile('image_text_file', 'items', build),
             InputFile('user_profile_file', 'users', build))
    cfg = ml_collections.ConfigDict(dict(
        data_dir=str(shop.parent), dataset='shop', image_file='image_feat.npy',
        text_file='text_feat.npy', cache_dir='', image_text_file='image_text_feat.npy',
        user_profile_file='user_preferences_feat.npy'))
    with pytest.raises(DataError) as err:
        experiment.load_dataset(cfg, files)
    line = str(err.value)
    assert '\n' not in line
    assert line.startswith(f'{shop / "image_text_feat.npy"} does not exist')
    assert 'data.image_text_file' in line
    assert line.endswith(f'build it with: python -m data_prep.mllmrec --data_dir {shop.parent} '
                         f'--dataset shop')
    # The command it names makes the files, and the dataset then loads with them.
    run(shop, hashing=False)
    ds = experiment.load_dataset(cfg, files)
    np.testing.assert_array_equal(ds.extra['image_text_file'], TEXT_FEAT)
    np.testing.assert_allclose(ds.extra['user_profile_file'], HAND_USERS, atol=1e-7)
