"""Tests of the synthetic data generator (lirdrec_jax.synthetic): the embedded default dataset,
the benchmark's exact-count datasets, and the `python -m data_prep.synthetic` front end."""
import hashlib
import json

import numpy as np
import pytest

from data_prep import synthetic as synthetic_cli
from lirdrec_jax import data, mmrec_files, model_inputs, synthetic, word_view
from lirdrec_jax.data import DataError

SMALL = dict(n_users=200, n_items=120, image_dim=24, text_dim=16)
FILES = ('small.inter', 'image_feat.npy', 'text_feat.npy')


def read_inter(folder, name):
    """The .inter file as a dict of int columns (checked header)."""
    lines = (folder / f'{name}.inter').read_text().splitlines()
    assert lines[0].split('\t') == ['userID', 'itemID', 'rating', 'timestamp', 'x_label']
    cols = np.array([ln.split('\t') for ln in lines[1:]], dtype=np.int64)
    return dict(zip(lines[0].split('\t'), cols.T))


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp('synthetic')
    folder = synthetic.write_synthetic_dataset(root, 'small', seed=3, **SMALL)
    return root, folder


def test_deterministic_byte_identical(small, tmp_path):
    _, folder = small
    again = synthetic.write_synthetic_dataset(tmp_path, 'small', seed=3, **SMALL)
    for fname in FILES:
        assert (folder / fname).read_bytes() == (again / fname).read_bytes(), fname
    other = synthetic.write_synthetic_dataset(tmp_path / 'other', 'small', seed=4, **SMALL)
    assert (folder / 'small.inter').read_bytes() != (other / 'small.inter').read_bytes()


def test_five_core_and_contiguous_ids(small):
    _, folder = small
    cols = read_inter(folder, 'small')
    users, items = cols['userID'], cols['itemID']
    n_users, n_items = users.max() + 1, items.max() + 1
    assert np.array_equal(np.unique(users), np.arange(n_users))
    assert np.array_equal(np.unique(items), np.arange(n_items))
    assert np.bincount(users).min() >= 5 and np.bincount(items).min() >= 5
    # (user, item) pairs are distinct: users draw without replacement.
    assert np.unique(users * n_items + items).size == users.size
    assert set(np.unique(cols['rating'])) <= {1, 2, 3, 4, 5}


def test_every_user_has_each_split_in_time_order(small):
    _, folder = small
    cols = read_inter(folder, 'small')
    users, labels, times = cols['userID'], cols['x_label'], cols['timestamp']
    n_users = users.max() + 1
    for label in (0, 1, 2):
        assert np.array_equal(np.unique(users[labels == label]), np.arange(n_users)), label
    # Each user's valid rows come after all train rows, test rows after all valid rows.
    for earlier, later in ((0, 1), (1, 2)):
        last = np.full(n_users, np.iinfo(np.int64).min)
        np.maximum.at(last, users[labels == earlier], times[labels == earlier])
        first = np.full(n_users, np.iinfo(np.int64).max)
        np.minimum.at(first, users[labels == later], times[labels == later])
        assert np.all(last < first)
    share = np.bincount(labels) / labels.size
    assert 0.7 < share[0] < 0.85 and 0.07 < share[1] < 0.16 and 0.07 < share[2] < 0.16


def test_feature_shapes_and_properties(small):
    _, folder = small
    n_items = read_inter(folder, 'small')['itemID'].max() + 1
    image = np.load(folder / 'image_feat.npy')
    text = np.load(folder / 'text_feat.npy')
    assert image.dtype == np.float32 and image.shape == (n_items, 24)
    assert text.dtype == np.float32 and text.shape == (n_items, 16)
    assert image.min() >= 0.0 and image.any(axis=1).all()
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, rtol=1e-5)


def test_load_mmrec_loads_it(small):
    root, _ = small
    ds = data.load_mmrec(root, 'small')
    cols = read_inter(root / 'small', 'small')
    assert ds.n_users == cols['userID'].max() + 1 and ds.n_items == cols['itemID'].max() + 1
    assert ds.train.users.size + ds.valid.users.size + ds.test.users.size == cols['userID'].size
    assert ds.image_feat.shape == (ds.n_items, 24) and ds.text_feat.shape == (ds.n_items, 16)
    _, stats = mmrec_files.prepare_arrays(root / 'small', 'small')
    assert stats['dropped_valid'] == 0 and stats['dropped_test'] == 0


def test_default_dataset_generated_once(tmp_path, monkeypatch):
    monkeypatch.setenv(synthetic.CACHE_ENV, str(tmp_path / 'cache'))
    assert synthetic.default_dataset_dir() == tmp_path / 'cache' / 'synthetic-v1'
    data_dir, name = synthetic.ensure_default_dataset()
    assert (data_dir, name) == (tmp_path / 'cache' / 'synthetic-v1', 'synthetic')
    inter = data_dir / name / 'synthetic.inter'
    stamp = inter.stat().st_mtime_ns
    assert synthetic.ensure_default_dataset() == (data_dir, name)
    assert inter.stat().st_mtime_ns == stamp  # reused, not regenerated
    # No temporary folders are left next to it.
    assert [p.name for p in (tmp_path / 'cache').iterdir()] == ['synthetic-v1']

    ds = data.load_mmrec(data_dir, name)
    assert ds.image_feat.shape[1] == 512 and ds.text_feat.shape[1] == 384
    per_user = (ds.train.users.size + ds.valid.users.size + ds.test.users.size) / ds.n_users
    assert 12 <= per_user <= 20
    assert ds.n_users > 1400 and ds.n_items > 600


def test_default_dataset_gains_the_missing_model_inputs_only(tmp_path, monkeypatch):
    monkeypatch.setenv(synthetic.CACHE_ENV, str(tmp_path))
    # A default folder written before the model inputs existed: the three original files.
    folder = synthetic.default_dataset_dir() / 'synthetic'
    folder.mkdir(parents=True)
    d = synthetic.generate_synthetic(n_users=150, n_items=90, image_dim=8, text_dim=6)
    synthetic.write_mmrec_files(folder.parent, 'synthetic', d)
    built = {f: (folder / f).read_bytes() for f in ('image_text_feat.npy',
                                                   'user_preferences_feat.npy')}
    for f in built:
        (folder / f).unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    synthetic.ensure_default_dataset()
    # Added from the folder's own files, the same bytes as written with the data; nothing else
    # rewritten, no temporary file left.
    assert {f: (folder / f).read_bytes() for f in built} == built
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name in stamps} == stamps
    assert sorted(p.name for p in folder.iterdir()) == sorted(list(stamps) + list(built))
    # Only what is missing: an existing one is kept as it is.
    np.save(folder / 'user_preferences_feat.npy', np.ones((3, 3), np.float32))
    (folder / 'image_text_feat.npy').unlink()
    synthetic.ensure_default_dataset()
    assert np.load(folder / 'user_preferences_feat.npy').shape == (3, 3)
    assert (folder / 'image_text_feat.npy').read_bytes() == built['image_text_feat.npy']


def test_model_inputs_written_with_the_data(small):
    _, folder = small
    d = synthetic.generate_synthetic(seed=3, **SMALL)
    np.testing.assert_array_equal(np.load(folder / 'image_text_feat.npy'), d.text_feat)
    users = np.load(folder / 'user_preferences_feat.npy')
    train = d.x_label == 0
    for u in (0, 7, int(d.users.max())):
        mine = d.items[train & (d.users == u)]
        np.testing.assert_allclose(users[u], d.text_feat[mine].astype(np.float64).mean(0),
                                   rtol=1e-6)
        # Must fail: the mean over all of the user's rows (valid and test too) differs.
        everything = d.items[d.users == u]
        assert not np.allclose(users[u], d.text_feat[everything].mean(0), rtol=1e-6)


def test_default_dataset_dir_without_env(tmp_path, monkeypatch):
    monkeypatch.delenv(synthetic.CACHE_ENV, raising=False)
    monkeypatch.setenv('HOME', str(tmp_path))
    assert synthetic.default_dataset_dir() == tmp_path / '.cache' / 'lirdrec_jax' / 'synthetic-v1'


def test_incomplete_default_dataset_raises(tmp_path, monkeypatch):
    monkeypatch.setenv(synthetic.CACHE_ENV, str(tmp_path))
    (tmp_path / 'synthetic-v1' / 'synthetic').mkdir(parents=True)
    with pytest.raises(DataError, match=r'synthetic-v1 exists but lacks .*synthetic\.inter.*'
                                        r'Delete .* to regenerate'):
        synthetic.ensure_default_dataset()


def test_cli_writes_and_summarizes(tmp_path, capsys):
    assert synthetic_cli.main(['--out_dir', str(tmp_path), '--name', 'cli', '--n_users', '120',
                               '--n_items', '80', '--image_dim', '8', '--text_dim', '8']) == 0
    out = capsys.readouterr().out
    assert 'wrote' in out and 'split rows: train' in out
    for fname in ('cli.inter', 'image_text_feat.npy', 'user_preferences_feat.npy',
                  'item_text.jsonl', word_view.WORDS_FILE, word_view.VOCAB_FILE):
        assert (tmp_path / 'cli' / fname).is_file()


def test_invalid_generator_arguments():
    with pytest.raises(ValueError, match='min_length'):
        synthetic.generate_synthetic(min_length=3)


# --------------------------------------------------------------------------- the default's bytes

# sha256 of the embedded default dataset (the published default result, test Recall@20 0.4722,
# was measured on exactly these bytes). A change here changes every default run: bump
# DEFAULT_VERSION and re-measure the README's results instead of editing these values.
DEFAULT_SHA256 = {
    'synthetic.inter': '9a478af29dd98354ba33dce3fe453c1e679efac8d08cba1b3b247c5fed91d6c3',
    'image_feat': '28eea8384e19b9fb649aa2d189819e937d34a2c87016e6c717c47f7a05ee3019',
    'text_feat': '2c0e6b113d2adb264054cb29a120f5b1e20a0702ebe218ea732b1b6b05942571',
    # The no-LLM inputs of MLLMRec (lirdrec_jax.model_inputs): text_feat itself, and the mean
    # of it over each user's training items.
    'image_text_feat': '2c0e6b113d2adb264054cb29a120f5b1e20a0702ebe218ea732b1b6b05942571',
    'user_preferences_feat': '4a08c30b0e752892f32f935d72389ca837d5da317362baa45358d04ca65168b3',
}


def test_default_dataset_bytes_are_pinned():
    d = synthetic.generate_synthetic()
    assert synthetic.DEFAULT_VERSION == 'synthetic-v1'
    assert d.image_feat.dtype == np.float32 and d.text_feat.dtype == np.float32
    train = d.x_label == 0
    items = model_inputs.no_llm_item_rows(d.text_feat)
    users, _ = model_inputs.mean_user_rows(items, d.users[train], d.items[train],
                                           int(d.users.max()) + 1)
    got = {'synthetic.inter': synthetic.format_inter(d).encode(),
           'image_feat': d.image_feat.tobytes(), 'text_feat': d.text_feat.tobytes(),
           'image_text_feat': items.tobytes(), 'user_preferences_feat': users.tobytes()}
    assert {k: hashlib.sha256(v).hexdigest() for k, v in got.items()} == DEFAULT_SHA256


# --------------------------------------------------------------------------- item texts, word view

WORD_FILES = ('item_text.jsonl', word_view.WORDS_FILE, word_view.VOCAB_FILE)
# sha256 of the default dataset's item texts and word view (DGVAE's inputs): the item_text.jsonl
# and vocabulary bytes, and the CSR arrays of the matrix (indptr, indices as int64, data as
# float32, little-endian; the .npz container itself depends on the platform's zip metadata).
DEFAULT_WORDS_SHA256 = {
    'item_text.jsonl': '3e4f608732ccb3cda7fac4247977530824587a6d99b7be373261d0d9dce1b7a9',
    'vocabulary': '0492b5318b5a41f2174038686025e927adbdaf7844e848e5c4a2f089041d8072',
    'words_csr': 'e1f0c0a3868e816ad2af1e36c05e4e74f2652829e312949a536f7287da49028c',
}


def csr_bytes(m):
    return (m.indptr.astype('<i8').tobytes() + m.indices.astype('<i8').tobytes()
            + m.data.astype('<f4').tobytes())


def default_word_view(d):
    train = d.x_label == 0
    docs = [word_view.item_document(t, None) for t in d.item_text]
    return word_view.build_word_view(docs, d.users[train], d.items[train], int(d.users.max()) + 1)


@pytest.fixture(scope='module')
def default_data():
    return synthetic.generate_synthetic()


def test_default_word_files_are_pinned(default_data):
    d = default_data
    view = default_word_view(d)
    assert view.matrix.shape == (int(d.users.max()) + 1, len(view.vocabulary))
    got = {'item_text.jsonl': synthetic.format_item_texts(d.item_text).encode(),
           'vocabulary': word_view.format_vocabulary(view.vocabulary),
           'words_csr': csr_bytes(view.matrix)}
    assert {k: hashlib.sha256(v).hexdigest() for k, v in got.items()} == DEFAULT_WORDS_SHA256


def test_item_texts_carry_signal_about_the_choices(default_data):
    """Ranking by the word overlap of a user's word view with an item's text puts the user's
    test items above most items (AUC well above 0.5); must fail: with the texts shuffled over
    the items, the same ranking is at chance."""
    d = default_data
    view = default_word_view(d)
    users = view.matrix.toarray()
    column = {w: j for j, w in enumerate(view.vocabulary)}
    test = d.x_label == 2

    def auc(texts):
        bags = np.zeros((len(texts), len(column)))
        for i, text in enumerate(texts):
            for w in word_view.tokenize(text):
                if w in column:
                    bags[i, column[w]] += 1
        scores = users[d.users[test]] @ bags.T
        mine = scores[np.arange(scores.shape[0]), d.items[test]]
        return (scores < mine[:, None]).mean()

    shuffled = np.random.default_rng(0).permutation(len(d.item_text))
    assert auc(d.item_text) > 0.7
    assert 0.45 < auc([d.item_text[k] for k in shuffled]) < 0.55
    # Generic filler words are in most user documents: max_df drops every one of them.
    assert not set(synthetic.FILLER_WORDS) & set(view.vocabulary)
    assert set(view.vocabulary) <= set(synthetic.topic_words(synthetic.TOPIC_WORDS))


def test_item_texts_come_from_their_own_stream():
    f = np.random.default_rng(1).standard_normal((30, 4))
    texts = synthetic.item_texts(5, f)
    assert texts == synthetic.item_texts(5, f) and texts != synthetic.item_texts(6, f)
    assert all(len(t.split()) == synthetic.WORDS_PER_ITEM + synthetic.FILLER_PER_ITEM
               for t in texts)
    assert len(set(synthetic.topic_words(4225))) == 4225
    assert not set(synthetic.topic_words(synthetic.TOPIC_WORDS)) & set(synthetic.FILLER_WORDS)


def test_word_files_written_with_the_data(small):
    root, folder = small
    d = synthetic.generate_synthetic(seed=3, **SMALL)
    lines = (folder / 'item_text.jsonl').read_text(encoding='utf-8').splitlines()
    assert [json.loads(x) for x in lines] == [{'itemID': i, 'text': t}
                                              for i, t in enumerate(d.item_text)]
    import scipy.sparse as sp
    matrix = sp.load_npz(folder / word_view.WORDS_FILE)
    vocab = word_view.read_vocabulary(folder / word_view.VOCAB_FILE, matrix.shape[1])
    view = default_word_view(d)
    assert vocab == view.vocabulary
    np.testing.assert_array_equal(matrix.toarray(), view.matrix.toarray())
    # It loads as a model's sparse input file.
    from lirdrec_jax import experiment
    from lirdrec_jax.models.base import InputFile
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(data_dir=str(root), dataset='small', cache_dir='',
                                         image_file='image_feat.npy', text_file='text_feat.npy',
                                         words_file=word_view.WORDS_FILE))
    ds = experiment.load_dataset(cfg, (InputFile('words_file', 'users', '', kind='sparse'),))
    np.testing.assert_array_equal(ds.extra['words_file'].toarray(), view.matrix.toarray())


def test_default_dataset_gains_the_missing_word_files(tmp_path, monkeypatch, default_data,
                                                      capsys):
    monkeypatch.setenv(synthetic.CACHE_ENV, str(tmp_path))
    folder = synthetic.default_dataset_dir() / 'synthetic'
    folder.mkdir(parents=True)
    synthetic.write_mmrec_files(folder.parent, 'synthetic', default_data)
    built = {f: (folder / f).read_bytes() for f in WORD_FILES}
    for f in built:
        (folder / f).unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    synthetic.ensure_default_dataset()
    # Regenerated from the generator (the folder's .inter is the default's): the same bytes as
    # written with the data, nothing else rewritten, no temporary file left.
    assert {f: (folder / f).read_bytes() for f in WORD_FILES} == built
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name in stamps} == stamps
    assert sorted(p.name for p in folder.iterdir()) == sorted(list(stamps) + list(built))
    # Must fail: a folder that is not the default generator's output gets no texts (warned).
    other = tmp_path / 'other'
    monkeypatch.setenv(synthetic.CACHE_ENV, str(other))
    small = synthetic.default_dataset_dir() / 'synthetic'
    small.mkdir(parents=True)
    synthetic.write_mmrec_files(small.parent, 'synthetic', synthetic.generate_synthetic(
        n_users=150, n_items=90, image_dim=8, text_dim=6))
    for f in WORD_FILES:
        (small / f).unlink()
    capsys.readouterr()
    synthetic.ensure_default_dataset()
    assert not any((small / f).exists() for f in WORD_FILES)
    assert "is not the default generator's output" in capsys.readouterr().err


# --------------------------------------------------------------------------- exact counts

EXACT = (300, 120, 2000)


@pytest.fixture(scope='module')
def exact():
    return synthetic.generate_exact_counts(*EXACT, seed=1, image_dim=16, text_dim=8)


def test_exact_counts_are_exact(exact):
    n_users, n_items, n_interactions = EXACT
    assert exact.users.size == n_interactions
    assert np.array_equal(np.unique(exact.users), np.arange(n_users))
    assert exact.items.min() >= 0 and exact.items.max() < n_items
    assert exact.image_feat.shape == (n_items, 16) and exact.text_feat.shape == (n_items, 8)
    per_user = np.bincount(exact.users)
    assert per_user.min() >= 5 and per_user.max() <= n_items // 2
    assert np.unique(exact.users * n_items + exact.items).size == exact.users.size  # distinct
    assert set(np.unique(exact.ratings)) <= {1, 2, 3, 4, 5}


def test_exact_counts_are_long_tailed_and_split_in_time_order(exact):
    per_item = np.sort(np.bincount(exact.items, minlength=EXACT[1]))[::-1]
    # Long tail: the top 10% of items hold well over 10% of the rows, the top item several
    # times the median.
    assert per_item[:12].sum() > 0.2 * EXACT[2] and per_item[0] > 3 * np.median(per_item)
    users, labels, times = exact.users, exact.x_label, exact.timestamps
    assert np.all(np.diff(users) >= 0) and np.all(np.diff(times)[np.diff(users) == 0] >= 0)
    for label in (0, 1, 2):
        assert np.unique(users[labels == label]).size == EXACT[0], label
    # Per user: train rows, then the valid rows, then the test rows (in time order).
    for u in range(EXACT[0]):
        assert np.all(np.diff(labels[users == u]) >= 0)
    share = np.bincount(labels) / labels.size
    assert 0.6 < share[0] < 0.85 and share[1] == share[2]


def test_exact_counts_deterministic_and_in_memory_dataset(exact):
    again = synthetic.generate_exact_counts(*EXACT, seed=1, image_dim=16, text_dim=8)
    assert all(np.array_equal(a, b) for a, b in zip(exact, again))
    ds = synthetic.to_dataset(exact, 'bench')
    assert (ds.name, ds.n_users, ds.n_items) == ('bench', EXACT[0], EXACT[1])
    assert sum(s.users.size for s in (ds.train, ds.valid, ds.test)) == EXACT[2]
    assert ds.train.users.dtype == np.int32 and ds.test.items.dtype == np.int32
    np.testing.assert_array_equal(ds.valid.items, exact.items[exact.x_label == 1])
    assert ds.image_feat is exact.image_feat


def test_exact_counts_item_texts_leave_the_other_arrays_unchanged(exact):
    with_text = synthetic.generate_exact_counts(*EXACT, seed=1, image_dim=16, text_dim=8,
                                                item_text=True)
    assert exact.item_text is None and len(with_text.item_text) == EXACT[1]
    for name in synthetic.SyntheticData._fields[:-1]:
        np.testing.assert_array_equal(getattr(with_text, name), getattr(exact, name))


def test_in_memory_dataset_matches_the_written_files(small):
    root, _ = small
    d = synthetic.generate_synthetic(seed=3, **SMALL)
    mem, disk = synthetic.to_dataset(d, 'small'), data.load_mmrec(root, 'small')
    assert (mem.n_users, mem.n_items) == (disk.n_users, disk.n_items)
    for split in ('train', 'valid', 'test'):
        for a, b in zip(getattr(mem, split), getattr(disk, split)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(mem.image_feat, disk.image_feat)


def test_exact_lengths_respect_the_cap_and_the_total():
    rng = np.random.default_rng(0)
    lengths = synthetic.exact_lengths(rng, 50, 600, 5, 13)  # the cap binds for many users
    assert lengths.sum() == 600 and lengths.min() >= 5 and lengths.max() <= 13
    with pytest.raises(ValueError, match='cannot give 50 users between 5 and 13 each'):
        synthetic.exact_lengths(rng, 50, 700, 5, 13)
    with pytest.raises(ValueError, match='cannot give'):
        synthetic.generate_exact_counts(100, 50, 400)  # fewer than 5 per user


def test_writing_exact_counts_with_an_unused_last_item_is_refused(tmp_path, exact):
    unused = exact._replace(image_feat=np.ones((EXACT[1] + 1, 16), np.float32))
    with pytest.raises(ValueError, match='needs a row for item 120'):
        synthetic.write_mmrec_files(tmp_path, 'x', unused)
