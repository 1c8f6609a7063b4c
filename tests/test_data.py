"""Tests of MMRec-layout conversion (lirdrec_jax.mmrec_files), loading (lirdrec_jax.data) and the
`python -m data_prep.mmrec` front end."""
import errno
import json
import os
import re

import numpy as np
import pytest

from data_prep import mmrec
from lirdrec_jax import data, mmrec_files
from lirdrec_jax.data import DataError

NAME = 'toy'
# Columns shuffled, plus `rating`, `timestamp` and an unrelated `note` column that are ignored.
HEADER = 'x_label\trating\titemID\tnote\tuserID\ttimestamp'
# (user, item, x_label), file lines 2..11.
ROWS = [
    (0, 0, 0),
    (0, 1, 0),
    (1, 2, 0),
    (0, 3, 1),
    (1, 1, 2),
    (3, 4, 1),  # user 3 has no train row: dropped from valid
    (0, 2, 2),
    (1, 0, 0),
    (1, 0, 0),  # duplicate train row: kept
    (4, 5, 2),  # user 4 has no train row: dropped from test; still counts for n_users/n_items
]
N_USERS, N_ITEMS = 5, 6


def inter_text(rows, header=HEADER):
    lines = [header] + [f'{x}\t5.0\t{i}\tok\t{u}\t{1000 + k}' for k, (u, i, x) in enumerate(rows)]
    return '\n'.join(lines) + '\n'


def features(n_rows=N_ITEMS, dim=4, seed=0):
    return np.random.default_rng(seed).random((n_rows, dim)) + 0.1


def make_dataset(root, text=None, image='default', textfeat='default'):
    """Writes <root>/toy/{toy.inter, image_feat.npy, text_feat.npy}; returns the dataset dir."""
    folder = root / NAME
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f'{NAME}.inter').write_text(inter_text(ROWS) if text is None else text)
    if isinstance(image, str) and image == 'default':
        image = features(dim=4, seed=0).astype(np.float32)
    if isinstance(textfeat, str) and textfeat == 'default':
        textfeat = features(dim=3, seed=1)  # float64 on purpose: stored as float32
    for fname, arr in (('image_feat.npy', image), ('text_feat.npy', textfeat)):
        if arr is not None:
            np.save(folder / fname, arr)
    return folder


# --------------------------------------------------------------------------- exact semantics


def test_convert_exact_counts_and_split_contents(tmp_path):
    folder = make_dataset(tmp_path)
    cache = mmrec_files.convert_mmrec(folder, NAME)
    assert cache == folder / '.lirdrec_jax_cache' / 'toy.npz'
    with np.load(cache, allow_pickle=False) as z:
        assert int(z['n_users']) == N_USERS and int(z['n_items']) == N_ITEMS
        np.testing.assert_array_equal(z['train_users'], [0, 0, 1, 1, 1])
        np.testing.assert_array_equal(z['train_items'], [0, 1, 2, 0, 0])
        np.testing.assert_array_equal(z['valid_users'], [0])
        np.testing.assert_array_equal(z['valid_items'], [3])
        np.testing.assert_array_equal(z['test_users'], [1, 0])
        np.testing.assert_array_equal(z['test_items'], [1, 2])
        for key in ('train_users', 'train_items', 'valid_users', 'test_items'):
            assert z[key].dtype == np.int32
        assert z['image_feat'].dtype == np.float32 and z['image_feat'].shape == (6, 4)
        assert z['text_feat'].dtype == np.float32 and z['text_feat'].shape == (6, 3)
        assert int(z['dropped_valid']) == 1 and int(z['dropped_test']) == 1
        assert 'toy.inter' in str(z['source_fingerprint'])


def test_prepare_arrays_reports_dropped_rows(tmp_path):
    folder = make_dataset(tmp_path)
    _, stats = mmrec_files.prepare_arrays(folder, NAME)
    assert stats['dropped_valid'] == 1 and stats['dropped_test'] == 1
    assert (stats['n_train'], stats['n_valid'], stats['n_test']) == (5, 1, 2)
    assert stats['image_feat_shape'] == (6, 4) and stats['text_feat_shape'] == (6, 3)
    assert stats['sparsity'] == pytest.approx(1 - 8 / 30)


def test_load_mmrec_and_describe(tmp_path):
    make_dataset(tmp_path)
    ds = data.load_mmrec(tmp_path, NAME)
    assert isinstance(ds, data.MMRecDataset)
    assert (ds.name, ds.n_users, ds.n_items) == (NAME, N_USERS, N_ITEMS)
    np.testing.assert_array_equal(ds.train.users, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ds.test.items, [1, 2])
    np.testing.assert_allclose(ds.text_feat, features(dim=3, seed=1).astype(np.float32))
    text = data.describe(ds)
    assert '5 users, 6 items' in text and 'train 5, valid 1, test 2' in text
    assert 'image 4-d, text 3-d' in text


def test_optional_feature_file_and_custom_names(tmp_path):
    folder = make_dataset(tmp_path, image=None)
    ds = data.load_mmrec(tmp_path, NAME)
    assert ds.image_feat is None and ds.text_feat.shape == (6, 3)
    np.save(folder / 'clip_img.npy', features(dim=2))
    ds = data.load_mmrec(tmp_path, NAME, image_file='clip_img.npy', text_file='')
    assert ds.image_feat.shape == (6, 2) and ds.text_feat is None
    assert 'text absent' in data.describe(ds)


def test_blank_lines_crlf_and_bom_are_tolerated(tmp_path):
    text = '\ufeff' + inter_text(ROWS).replace('\n', '\r\n')
    lines = text.split('\r\n')
    text = '\r\n'.join(lines[:3] + [''] + lines[3:]) + '\r\n'
    folder = make_dataset(tmp_path, text=text)
    ds = data.load_mmrec(tmp_path, NAME)
    np.testing.assert_array_equal(ds.train.items, [0, 1, 2, 0, 0])
    # Line numbers stay the file's own across the skipped blank line.
    (folder / 'toy.inter').write_text('userID\titemID\tx_label\n0\t0\t0\n\n0\tx\t0\n')
    with pytest.raises(DataError, match=r'toy\.inter, line 4: column itemID'):
        mmrec_files.read_inter(folder / 'toy.inter')


def test_source_files_are_not_modified(tmp_path):
    folder = make_dataset(tmp_path)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    data.load_mmrec(tmp_path, NAME)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()
             if p.is_file()}
    assert before == after
    assert not [p for p in (folder / '.lirdrec_jax_cache').iterdir() if p.suffix == '.tmp']


# --------------------------------------------------------------------------- cache


def test_cache_reused_when_fresh_and_rebuilt_when_inter_changes(tmp_path, monkeypatch):
    folder = make_dataset(tmp_path)
    data.load_mmrec(tmp_path, NAME)
    cache = mmrec_files.default_cache_path(folder, NAME)
    assert mmrec_files.cache_is_fresh(folder, NAME, cache)

    calls = []
    real_convert = mmrec_files.convert_arrays
    monkeypatch.setattr(mmrec_files, 'convert_arrays',
                        lambda *a, **k: calls.append(1) or real_convert(*a, **k))
    data.load_mmrec(tmp_path, NAME)
    assert calls == []  # fresh: reused

    (folder / 'toy.inter').write_text(inter_text(ROWS + [(2, 5, 0)]))
    assert not mmrec_files.cache_is_fresh(folder, NAME, cache)
    ds = data.load_mmrec(tmp_path, NAME)
    assert calls == [1]
    np.testing.assert_array_equal(ds.train.users, [0, 0, 1, 1, 1, 2])

    # The key is the content: a new mtime alone (a touch, a fresh copy) keeps the cache.
    stat = (folder / 'toy.inter').stat()
    os.utime(folder / 'toy.inter', ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert mmrec_files.cache_is_fresh(folder, NAME, cache)


def test_cache_stale_when_feature_file_removed_or_cache_corrupt(tmp_path):
    folder = make_dataset(tmp_path)
    cache = mmrec_files.convert_mmrec(folder, NAME)
    (folder / 'image_feat.npy').unlink()
    assert not mmrec_files.cache_is_fresh(folder, NAME, cache)
    assert data.load_mmrec(tmp_path, NAME).image_feat is None
    cache.write_bytes(b'not a zip file')
    assert not mmrec_files.cache_is_fresh(folder, NAME, cache)
    assert data.load_mmrec(tmp_path, NAME).text_feat.shape == (6, 3)


def test_cache_dir_option(tmp_path):
    make_dataset(tmp_path / 'src')
    ds = data.load_mmrec(tmp_path / 'src', NAME, cache_dir=tmp_path / 'cache')
    assert (tmp_path / 'cache' / 'toy.npz').is_file()
    assert not (tmp_path / 'src' / NAME / '.lirdrec_jax_cache').exists()
    assert ds.n_items == N_ITEMS


def test_inconsistent_cache_is_rejected(tmp_path):
    folder = make_dataset(tmp_path)
    cache = mmrec_files.convert_mmrec(folder, NAME)
    with np.load(cache, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays['train_items'] = arrays['train_items'] + 100  # out of range, fingerprint kept
    np.savez(cache, **arrays)
    with pytest.raises(DataError, match=r'toy\.npz: field train_items .*expected ids in \[0, 6\)'):
        data.load_mmrec(tmp_path, NAME)


def test_same_size_edit_with_restored_mtime_rebuilds_cache(tmp_path):
    folder = make_dataset(tmp_path)
    data.load_mmrec(tmp_path, NAME)

    def edit_keeping_size_and_mtime(path, content):
        stat = path.stat()
        assert len(content) == stat.st_size
        path.write_bytes(content)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    inter = folder / 'toy.inter'
    edit_keeping_size_and_mtime(inter, inter_text(_rows_with(3, (0, 4, 0))).encode())
    image = folder / 'image_feat.npy'
    edit_keeping_size_and_mtime(image, image.read_bytes()[:-4] + np.float32(7.5).tobytes())
    ds = data.load_mmrec(tmp_path, NAME)
    np.testing.assert_array_equal(ds.train.items, [0, 4, 2, 0, 0])
    assert ds.image_feat[-1, -1] == 7.5


def test_cache_with_old_fingerprint_is_rebuilt(tmp_path):
    folder = make_dataset(tmp_path)
    cache = mmrec_files.convert_mmrec(folder, NAME)
    # A cache written when the key was [name, size, mtime_ns] of each source file.
    stamp = lambda p: [p.name, p.stat().st_size, p.stat().st_mtime_ns]
    old_key = json.dumps({'format': 1, 'inter': stamp(folder / 'toy.inter'),
                          'image': stamp(folder / 'image_feat.npy'),
                          'text': stamp(folder / 'text_feat.npy')}, sort_keys=True)
    with np.load(cache, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays['source_fingerprint'] = np.str_(old_key)
    arrays['train_items'] = arrays['train_items'][::-1].copy()  # what a stale cache would hold
    np.savez(cache, **arrays)
    assert not mmrec_files.cache_is_fresh(folder, NAME, cache)
    np.testing.assert_array_equal(data.load_mmrec(tmp_path, NAME).train.items, [0, 1, 2, 0, 0])
    assert mmrec_files.cache_is_fresh(folder, NAME, cache)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')


def test_cache_write_failure_warns_and_continues_without_cache(tmp_path, monkeypatch, capsys):
    folder = make_dataset(tmp_path)
    monkeypatch.setattr(np, 'savez', _disk_full)
    ds = data.load_mmrec(tmp_path, NAME)
    assert ds.n_items == N_ITEMS and ds.image_feat.shape == (6, 4)
    cache_folder = folder / '.lirdrec_jax_cache'
    assert not [p for p in cache_folder.iterdir()]  # no cache, no stray temp file
    warnings = [l for l in capsys.readouterr().err.splitlines() if 'dataset cache' in l]
    assert len(warnings) == 1, warnings
    assert re.search(r'^warning: cannot write the dataset cache .*toy\.npz \(.*No space left'
                     r'.*--config\.data\.cache_dir=DIR', warnings[0]), warnings[0]


def test_uncreatable_cache_dir_warns_and_continues(tmp_path, capsys):
    make_dataset(tmp_path)
    blocker = tmp_path / 'not_a_folder'
    blocker.write_text('')
    ds = data.load_mmrec(tmp_path, NAME, cache_dir=blocker / 'cache')
    assert ds.n_items == N_ITEMS
    err = capsys.readouterr().err
    assert re.search(r'warning: cannot write the dataset cache .*not_a_folder/cache/toy\.npz'
                     r'.*--config\.data\.cache_dir=DIR', err), err


@pytest.mark.skipif(os.geteuid() == 0, reason='file modes do not deny root')
def test_read_only_data_folder_warns_and_continues(tmp_path, capsys):
    folder = make_dataset(tmp_path)
    folder.chmod(0o555)
    try:
        ds = data.load_mmrec(tmp_path, NAME)
    finally:
        folder.chmod(0o755)
    assert ds.n_items == N_ITEMS
    assert not (folder / '.lirdrec_jax_cache').exists()
    err = capsys.readouterr().err
    assert re.search(r'warning: cannot write the dataset cache .*\.lirdrec_jax_cache/toy\.npz'
                     r'.*--config\.data\.cache_dir=DIR', err), err


# --------------------------------------------------------------------------- reported, kept


def test_integer_features_are_converted_with_one_warning(tmp_path, capsys):
    make_dataset(tmp_path, image=(features(dim=4) * 10).astype(np.int64))
    ds = data.load_mmrec(tmp_path, NAME)
    assert ds.image_feat.dtype == np.float32
    lines = [l for l in capsys.readouterr().err.splitlines() if 'image_feat.npy' in l]
    assert len(lines) == 1 and re.search(r'^warning: .*image_feat\.npy: dtype int64 .*float32',
                                         lines[0]), lines
    data.load_mmrec(tmp_path, NAME)  # the cache holds float32 already: nothing to say
    assert 'image_feat.npy' not in capsys.readouterr().err


def test_duplicate_rows_are_kept_and_reported_once(tmp_path, capsys):
    make_dataset(tmp_path)  # ROWS repeat (user 1, item 0) on file lines 9 and 10
    ds = data.load_mmrec(tmp_path, NAME)
    np.testing.assert_array_equal(ds.train.users, [0, 0, 1, 1, 1])
    lines = [l for l in capsys.readouterr().err.splitlines() if 'duplicate' in l]
    assert len(lines) == 1, lines
    assert re.search(r'^warning: .*toy\.inter: 1 duplicate \(user, item\) row.*line 10 '
                     r'repeats user 1, item 0 of line 9', lines[0]), lines[0]


def test_item_beyond_feature_rows_names_the_inter_line(tmp_path):
    make_dataset(tmp_path, image=features(n_rows=5))  # ROWS' largest item, 5, is on line 11
    with pytest.raises(DataError, match=r'image_feat\.npy: 5 rows but .*toy\.inter, line 11 '
                                        r'has itemID 5 \(the largest, so n_items=6\)'):
        data.load_mmrec(tmp_path, NAME)


# --------------------------------------------------------------------------- bad inputs


def _rows_with(line, row):
    """ROWS with the row at file line `line` (2-based) replaced by `row`."""
    rows = list(ROWS)
    rows[line - 2] = row
    return rows


BAD_INTER = {
    'missing_column': (
        'userID\titemID\trating\n0\t0\t5\n',
        r"toy\.inter, line 1 \(header\): missing required column\(s\) \['x_label'\]; found "
        r"columns \['userID', 'itemID', 'rating'\]"),
    'duplicate_column': (
        'userID\titemID\tx_label\titemID\n0\t0\t0\t1\n',
        r"toy\.inter, line 1 \(header\): column\(s\) \['itemID'\] appear more than once"),
    'empty_file': ('', r'toy\.inter, line 1: empty; expected a tab-separated header'),
    'header_only': ('userID\titemID\tx_label\n', r'toy\.inter: no interaction rows'),
    'wrong_field_count': (
        'userID\titemID\tx_label\n0\t0\t0\n1\t1\n',
        r'toy\.inter, line 3: 2 tab-separated fields; expected 3'),
    'too_many_fields': (
        'userID\titemID\tx_label\n0\t0\t0\t9\n',
        r'toy\.inter, line 2: 4 tab-separated fields; expected 3'),
    'non_integer_user': (
        'userID\titemID\tx_label\n0\t0\t0\nabc\t1\t0\n',
        r"toy\.inter, line 3: column userID is 'abc'; expected an integer"),
    'float_x_label': (
        inter_text(ROWS).replace('1\t5.0\t3\tok\t0', '1.5\t5.0\t3\tok\t0'),
        r"toy\.inter, line 5: column x_label is '1\.5'; expected an integer"),
    'huge_id': (
        'userID\titemID\tx_label\n0\t' + '9' * 25 + '\t0\n',
        r'toy\.inter, line 2: column itemID is .*fits in 64 bits'),
    'negative_item': (
        inter_text(_rows_with(7, (3, -1, 1))),
        r'toy\.inter, line 7: itemID is -1; expected a 0-based id'),
    'negative_user': (
        inter_text(_rows_with(3, (-2, 1, 0))),
        r'toy\.inter, line 3: userID is -2'),
    'bad_x_label': (
        inter_text(_rows_with(6, (1, 1, 3))),
        r'toy\.inter, line 6: x_label is 3; expected 0 \(train\), 1 \(valid\) or 2 \(test\)'),
    'empty_train': (
        inter_text([(u, i, 1 if x == 0 else x) for u, i, x in ROWS]),
        r'toy\.inter: the train split is empty \(no row has x_label 0\)'),
    'empty_valid_after_filter': (
        inter_text([r for r in ROWS if r != (0, 3, 1)]),
        r'toy\.inter: the valid split is empty \(1 row\(s\) with x_label 1, 1 dropped'),
    'empty_test': (
        inter_text([r for r in ROWS if r[2] != 2]),
        r'toy\.inter: the test split is empty \(0 row\(s\) with x_label 2'),
}


@pytest.mark.parametrize('case', sorted(BAD_INTER))
def test_bad_inter_raises(tmp_path, case):
    text, pattern = BAD_INTER[case]
    make_dataset(tmp_path, text=text)
    with pytest.raises(DataError, match=pattern):
        data.load_mmrec(tmp_path, NAME)


def test_non_utf8_inter_raises(tmp_path):
    folder = make_dataset(tmp_path)
    (folder / 'toy.inter').write_bytes(b'userID\titemID\tx_label\n\xff\xfe\t0\t0\n')
    with pytest.raises(DataError, match=r'toy\.inter: not UTF-8 text'):
        data.load_mmrec(tmp_path, NAME)


def test_missing_dataset_folder_raises(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / NAME)) + r' does not exist.*'
                       r'MMRec layout'):
        data.load_mmrec(tmp_path, NAME)


def test_missing_inter_file_raises(tmp_path):
    folder = make_dataset(tmp_path)
    (folder / 'toy.inter').rename(folder / 'other.inter')
    with pytest.raises(DataError, match=r'interaction file .*toy\.inter does not exist; '
                                        r'expected MMRec layout.*other\.inter'):
        data.load_mmrec(tmp_path, NAME)


def _nan_at(row, value=np.nan):
    f = features(dim=3, seed=1)
    f[row, 1] = value
    return f


def _zero_at(row):
    f = features(dim=4).astype(np.float32)
    f[row] = 0.0
    return f


BAD_FEATURES = {
    'both_absent': (
        dict(image=None, textfeat=None),
        r'toy: neither feature file exists .*image_feat\.npy.*text_feat\.npy.*expected at least '
        r'one of them, of shape \(n_items=6, d\)'),
    'not_2d': (
        dict(textfeat=np.ones(6)),
        r'text_feat\.npy: shape \(6,\) is 1-D; expected a 2-D array of shape \(n_items=6, d\)'),
    'three_d': (
        dict(image=np.ones((6, 2, 2))),
        r'image_feat\.npy: shape \(6, 2, 2\) is 3-D'),
    'wrong_rows': (
        dict(image=features(n_rows=5)),
        r'image_feat\.npy: 5 rows but .*toy\.inter, line 11 has itemID 5 \(the largest, so '
        r'n_items=6\); expected one row per item, row i describing item i'),
    'no_columns': (
        dict(textfeat=np.zeros((6, 0))),
        r'text_feat\.npy: shape \(6, 0\) has no feature columns'),
    'nan': (
        dict(textfeat=_nan_at(2)),
        r'text_feat\.npy: row 2 \(item 2\) contains NaN or Inf'),
    'inf': (
        dict(image=_nan_at(4, np.inf)),
        r'image_feat\.npy: row 4 \(item 4\) contains NaN or Inf'),
    'float32_overflow': (
        dict(textfeat=_nan_at(1, 1e300)),
        r'text_feat\.npy: row 1 \(item 1\) contains NaN or Inf \(after conversion to float32\)'),
    'zero_row': (
        dict(image=_zero_at(3)),
        r'image_feat\.npy: row 3 \(item 3\) is all zeros'),
    'string_dtype': (
        dict(textfeat=np.full((6, 2), 'a')),
        r'text_feat\.npy: dtype <U1; expected a float array'),
}


@pytest.mark.parametrize('case', sorted(BAD_FEATURES))
def test_bad_features_raise(tmp_path, case):
    kwargs, pattern = BAD_FEATURES[case]
    make_dataset(tmp_path, **kwargs)
    with pytest.raises(DataError, match=pattern):
        data.load_mmrec(tmp_path, NAME)


@pytest.mark.parametrize('content', [b'garbage, not an npy file', b'\x93NUMPY\x01\x00trunc'])
def test_unloadable_npy_raises(tmp_path, content):
    folder = make_dataset(tmp_path)
    (folder / 'image_feat.npy').write_bytes(content)
    with pytest.raises(DataError, match=r'image_feat\.npy: cannot be loaded as a \.npy array'):
        data.load_mmrec(tmp_path, NAME)


def test_pickled_npy_raises(tmp_path):
    folder = make_dataset(tmp_path)
    np.save(folder / 'text_feat.npy', np.array([{'a': 1}] * 6, dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r'text_feat\.npy: cannot be loaded as a \.npy array'):
        data.load_mmrec(tmp_path, NAME)


def test_failed_conversion_leaves_no_cache(tmp_path):
    folder = make_dataset(tmp_path, image=_zero_at(0))
    with pytest.raises(DataError):
        data.load_mmrec(tmp_path, NAME)
    assert not mmrec_files.default_cache_path(folder, NAME).exists()


# --------------------------------------------------------------------------- CLI and speed


def test_cli_prints_summary(tmp_path, capsys):
    make_dataset(tmp_path)
    assert mmrec.main(['--data_dir', str(tmp_path), '--dataset', NAME]) == 0
    out = capsys.readouterr().out
    assert re.search(r'dropped cold-start valid rows\s+1', out)
    assert re.search(r'image_feat\s+\(6, 4\)', out) and 'cache (written)' in out
    assert mmrec.main(['--data_dir', str(tmp_path), '--dataset', NAME]) == 0
    assert 'cache (fresh, reused)' in capsys.readouterr().out


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert mmrec.main(['--data_dir', str(tmp_path), '--dataset', NAME]) == 1
    assert 'error: ' in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        mmrec.main(['--help'])
    assert exit_info.value.code == 0


def test_large_file_converts_with_exact_counts(tmp_path):
    """A real-size file (speed is measured by `python -m data_prep.mmrec`, not asserted here)."""
    n = 300_000
    rng = np.random.default_rng(0)
    users = rng.integers(0, 20_000, n)
    users[:20_000] = np.arange(20_000)  # every user has a train row below
    labels = np.where(np.arange(n) < 20_000, 0, rng.integers(0, 3, n))
    items = rng.integers(0, 1000, n)
    body = '\n'.join(f'{u}\t{i}\t4.0\t{x}' for u, i, x in zip(users.tolist(), items.tolist(),
                                                               labels.tolist()))
    folder = make_dataset(tmp_path, text='userID\titemID\trating\tx_label\n' + body + '\n',
                          image=None, textfeat=features(n_rows=1000, dim=8))
    cache = np.load(mmrec_files.convert_mmrec(folder, NAME))
    assert int(cache['n_users']) == 20_000 and int(cache['n_items']) == items.max() + 1
    for key, label in (('train', 0), ('valid', 1), ('test', 2)):
        np.testing.assert_array_equal(cache[f'{key}_users'], users[labels == label])
        np.testing.assert_array_equal(cache[f'{key}_items'], items[labels == label])


# --------------------------------------------------------------------------- a model's input files


def input_files_config(tmp_path, **names):
    """The data section of a model that reads two extra files (items_file, users_file)."""
    import ml_collections
    fields = dict(data_dir=str(tmp_path), dataset=NAME, image_file='image_feat.npy',
                  text_file='text_feat.npy', cache_dir='', items_file='items.npy',
                  users_file='users.npy')
    fields.update(names)
    return ml_collections.ConfigDict(fields)


def input_files():
    from lirdrec_jax.models.base import InputFile
    build = 'make-inputs --data_dir {data_dir} --dataset {dataset}'
    return (InputFile('items_file', 'items', build), InputFile('users_file', 'users', build))


def test_load_dataset_reads_the_declared_input_files(tmp_path):
    from lirdrec_jax import experiment
    folder = make_dataset(tmp_path)
    items, users = features(N_ITEMS, 2, seed=5), features(N_USERS, 7, seed=6)
    users[3] = 0.0  # a user row may be zero (a user without training interactions)
    np.save(folder / 'items.npy', items)
    np.save(folder / 'users.npy', users)
    ds = experiment.load_dataset(input_files_config(tmp_path), input_files())
    assert set(ds.extra) == {'items_file', 'users_file'}
    np.testing.assert_array_equal(ds.extra['items_file'], items.astype(np.float32))
    np.testing.assert_array_equal(ds.extra['users_file'], users.astype(np.float32))
    assert ds.extra['users_file'].dtype == np.float32
    with pytest.raises(TypeError):
        ds.extra['users_file'] = users  # read-only
    # Without declared files nothing else is read, and extra stays empty.
    assert experiment.load_dataset(input_files_config(tmp_path)).extra == {}
    assert data.load_mmrec(tmp_path, NAME).extra == {}


@pytest.mark.parametrize('case, message', [
    ('missing', r'users\.npy does not exist: the model reads it as data\.users_file \(one row '
                r'per user\); build it with: make-inputs --data_dir .* --dataset toy$'),
    ('rows', r'users\.npy \(data\.users_file\): 6 rows but the dataset has n_users=5; expected '
             r'one row per user'),
    ('nan', r'users\.npy \(data\.users_file\): row 2 \(user 2\) contains NaN or Inf'),
    ('ndim', r'users\.npy \(data\.users_file\): shape \(5,\) is 1-D; expected a 2-D array of '
             r'shape \(n_users=5, d\)'),
    ('not_npy', r'users\.npy \(data\.users_file\): cannot be loaded as a \.npy array'),
    ('field', r'config field data\.users_file is \'\'; the model reads a file with one row per '
              r'user named there'),
])
def test_load_dataset_input_file_errors(tmp_path, case, message):
    from lirdrec_jax import experiment
    folder = make_dataset(tmp_path)
    np.save(folder / 'items.npy', features(N_ITEMS, 2))
    users = {'rows': features(N_USERS + 1, 3), 'ndim': np.ones(N_USERS),
             'nan': features(N_USERS, 3)}.get(case, features(N_USERS, 3))
    if case == 'nan':
        users[2, 1] = np.nan
    if case != 'missing':
        np.save(folder / 'users.npy', users)
    if case == 'not_npy':
        (folder / 'users.npy').write_text('1,2,3\n')
    cfg = input_files_config(tmp_path, **({'users_file': ''} if case == 'field' else {}))
    with pytest.raises(DataError, match=message):
        experiment.load_dataset(cfg, input_files())


def test_load_dataset_item_input_rows_must_be_nonzero(tmp_path):
    from lirdrec_jax import experiment
    folder = make_dataset(tmp_path)
    items = features(N_ITEMS, 2)
    items[4] = 0.0
    np.save(folder / 'items.npy', items)
    np.save(folder / 'users.npy', features(N_USERS, 3))
    with pytest.raises(DataError, match=r'items\.npy \(data\.items_file\): row 4 \(item 4\) is '
                                        r'all zeros'):
        experiment.load_dataset(input_files_config(tmp_path), input_files())


def sparse_input_files():
    from lirdrec_jax.models.base import InputFile
    build = 'make-words --data_dir {data_dir} --dataset {dataset}'
    return (InputFile('words_file', 'users', build, kind='sparse'),)


def save_sparse_users(folder, n_rows=N_USERS, bad=None):
    """A (n_rows, 7) COO matrix with a duplicate entry, zero rows and a negative value."""
    import scipy.sparse as sp
    rows, cols = [0, 0, 2, 4, 4], [1, 1, 3, 0, 6]
    vals = [1.5, 0.5, 2.0, -1.0, 3.0 if bad is None else bad]
    sp.save_npz(folder / 'words.npz', sp.coo_matrix((vals, (rows, cols)), shape=(n_rows, 7)))


def test_load_dataset_reads_a_sparse_input_file(tmp_path):
    import scipy.sparse as sp
    from lirdrec_jax import experiment
    save_sparse_users(make_dataset(tmp_path))
    ds = experiment.load_dataset(input_files_config(tmp_path, words_file='words.npz'),
                                 sparse_input_files())
    words = ds.extra['words_file']
    assert isinstance(words, sp.csr_matrix) and words.dtype == np.float32
    assert words.has_canonical_format and words.shape == (N_USERS, 7)
    expected = np.zeros((N_USERS, 7), np.float32)
    expected[0, 1], expected[2, 3], expected[4, 0], expected[4, 6] = 2.0, 2.0, -1.0, 3.0
    np.testing.assert_array_equal(words.toarray(), expected)  # the duplicate (0, 1) is summed


@pytest.mark.parametrize('case, message', [
    ('missing', r'words\.npz does not exist: the model reads it as data\.words_file \(a sparse '
                r'matrix, one row per user\); build it with: make-words --data_dir .* --dataset '
                r'toy$'),
    ('rows', r'words\.npz \(data\.words_file\): 6 rows but the dataset has n_users=5; expected '
             r'one row per user'),
    ('nan', r'words\.npz \(data\.words_file\): row 4 \(user 4\) contains NaN or Inf'),
    ('not_npz', r'words\.npz \(data\.words_file\): cannot be loaded as a sparse \.npz matrix '
                r'\(the file does not start with the zip magic bytes'),
])
def test_load_dataset_sparse_input_file_errors(tmp_path, case, message):
    from lirdrec_jax import experiment
    folder = make_dataset(tmp_path)
    if case == 'rows':
        save_sparse_users(folder, n_rows=N_USERS + 1)
    elif case == 'nan':
        save_sparse_users(folder, bad=np.nan)
    elif case == 'not_npz':
        np.save(folder / 'words.npy', np.ones((N_USERS, 7)))
        (folder / 'words.npy').rename(folder / 'words.npz')
    with pytest.raises(DataError, match=message):
        experiment.load_dataset(input_files_config(tmp_path, words_file='words.npz'),
                                sparse_input_files())
