"""Tests of `python -m data_prep.amazon` on fixture files written here (no downloads)."""
import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep import amazon, interactions
from data_prep.encoders import HashingEncoder
from data_prep.readers import LineErrors, parse_record
from lirdrec_jax import data as data_lib
from lirdrec_jax.data import DataError

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- the fixture
#
# Items P1..P5 are the core; X, Y are sparse; Z has interactions but no metadata.
# Users C1..C5 rate P1..P5; W and V are on the edge of the 5-core.
#
#   C1: P1-P5, X, Y (7)   C2: P1-P5, X, Y (7)   C3: P1-P5, X, Y (7)   C4: P1-P5 (5)
#   C5: P1-P5 (5)         W: X, P1, P2, P3, Y (5)                     V: Y, P1, P2, P3, P4 (5)
#   Z: C1..C5 (5 rows, no metadata: dropped before filtering)
#   plus two duplicates: (C4, P2) again at the same time, (C5, P3) again 450 s earlier.
# 41 + 5 + 2 = 48 rows.
#
# 5-core, by hand (users and items are checked together in each round):
#   round 1: X has 4 raters (C1, C2, C3, W) -> X's 4 rows go. W drops to 4 rows.
#   round 2: W has 4 rows -> W's 4 rows go. Y loses W: raters V, C1, C2, C3 = 4.
#   round 3: Y has 4 raters -> Y's 4 rows go. V drops to 4 rows.
#   round 4: V has 4 rows -> V's 4 rows go. P1..P4 drop to 5 raters, P5 has 5.
#   round 5: every user C1..C5 has 5 rows, every item P1..P5 5 raters: stable.
# Result: 5 users, 5 items, 25 rows; 41 - 25 = 16 rows, 2 users (W, V), 2 items (X, Y) gone.
# Removing only X (one round) would have kept W, V and Y: the iteration matters.

P = {j: f'B0000000P{j}' for j in range(1, 6)}
X, Y, Z = 'B0000000X1', 'B0000000Y1', 'B0000000Z1'
C = {i: f'AC{i}' for i in range(1, 6)}
W, V = 'AW', 'AV'
T0 = 1_300_000_000
# Time (offset from T0) of C_i's row for P1..P5. Expected order, by (time, item id):
#   C1: P2 P4 P5 | P3 | P1      C2: P1 P2 P3 | P4 | P5      C3: P3 P4 P1 | P2 | P5 (P1, P2 tie)
#   C4: P5 P4 P3 | P2 | P1      C5: P3 P2 P1 | P4 | P5 (P3 kept at its earlier time, 50)
TIMES = {1: [500, 100, 400, 200, 300], 2: [100, 200, 300, 400, 500],
         3: [300, 300, 100, 200, 400], 4: [500, 400, 300, 200, 100],
         5: [200, 100, 500, 300, 400]}
# x_label of C_i's rows for P1..P5 (5 rows: max(1, round(0.5)) = 1 valid, 1 test, 3 train).
LABELS = {1: [2, 0, 1, 0, 0], 2: [0, 0, 0, 1, 2], 3: [0, 1, 0, 0, 2],
          4: [2, 1, 0, 0, 0], 5: [0, 0, 0, 1, 2]}


def fixture_rows():
    """(user, item, rating, timestamp) rows of the fixture, in file order."""
    rows = []
    for i in range(1, 6):
        for j in range(1, 6):
            rows.append((C[i], P[j], 5.0 if (i + j) % 2 else 4.0, T0 + TIMES[i][j - 1]))
    rows += [(C[i], X, 3.0, T0 + 600 + i) for i in (1, 2, 3)]
    rows += [(C[i], Y, 4.0, T0 + 700 + i) for i in (1, 2, 3)]
    rows += [(W, it, 5.0, T0 + 10 + n) for n, it in enumerate((X, P[1], P[2], P[3], Y))]
    rows += [(V, it, 5.0, T0 + 20 + n) for n, it in enumerate((Y, P[1], P[2], P[3], P[4]))]
    rows += [(C[i], Z, 5.0, T0 + 800 + i) for i in range(1, 6)]
    rows.append((C[4], P[2], 4.0, T0 + 400))   # exact repeat of an earlier row's time
    rows.append((C[5], P[3], 5.0, T0 + 50))    # earlier than the first (C5, P3) row at 500
    return rows


META_2014 = [
    {'asin': P[1], 'title': "Baby's First Blocks", 'brand': 'Acme',
     'categories': [['Baby', 'Toys', 'Blocks'], ['Toys & Games']],
     'description': 'Ten wooden\nblocks.'},
    {'asin': P[2], 'title': 'Soft Rattle', 'categories': [['Baby']]},
    {'asin': P[3], 'title': 'Night Light', 'brand': 'Glow', 'price': 9.99,
     'related': {'also_bought': [P[1]]}, 'salesRank': {'Baby': 12}},
    {'asin': P[4], 'description': 'Only a description'},
    {'asin': P[5], 'title': ''},
    {'asin': X, 'title': 'Sparse thing'},
    {'asin': Y, 'title': 'Other sparse thing'},
    {'asin': 'B0000000Q9', 'title': 'Never rated'},
]
META_2018 = [
    {'asin': P[1], 'title': "Baby's First Blocks", 'brand': 'Acme',
     'category': ['Baby', 'Toys', 'Blocks'], 'description': ['Ten wooden', 'blocks.']},
    {'asin': P[2], 'title': 'Soft Rattle', 'category': ['Baby'], 'description': []},
    {'asin': P[3], 'title': 'Night Light', 'brand': 'Glow', 'price': '$9.99'},
    {'asin': P[4], 'description': ['Only a description']},
    {'asin': P[5], 'title': '', 'brand': ''},
    {'asin': X, 'title': 'Sparse thing'},
    {'asin': Y, 'title': 'Other sparse thing'},
]
# The text of P1..P5 in item-id order, by hand (P5 has none: it gets the mean row).
TEXTS = ["Baby's First Blocks Acme Baby Toys Blocks Ten wooden blocks.", 'Soft Rattle Baby',
         'Night Light Glow', 'Only a description', None]


def write(path: Path, text: str, gz: bool = False) -> Path:
    data = text.encode('utf-8')
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def ratings_csv(rows, version='2014'):
    if version == '2014':
        return ''.join(f'{u},{i},{r},{t}\n' for u, i, r, t in rows)
    return ''.join(f'{i},{u},{r},{t}\n' for u, i, r, t in rows)


def reviews_jsonl(rows):
    return ''.join(json.dumps({'reviewerID': u, 'asin': i, 'reviewerName': 'x', 'overall': r,
                               'unixReviewTime': t, 'reviewText': 'ok', 'summary': 'ok'}) + '\n'
                   for u, i, r, t in rows)


def b_record(asin: str, values: dict, fmt: str = '<') -> bytes:
    """One `.b` record by hand: 10 ASCII bytes, then 4096 float32 ({index: value}, else 0)."""
    floats = [0.0] * amazon.IMAGE_DIM
    for k, v in values.items():
        floats[k] = v
    return asin.encode('ascii') + struct.pack(f'{fmt}{amazon.IMAGE_DIM}f', *floats)


def image_bytes(fmt='<') -> bytes:
    """P1..P4 (P5 absent), X, and a second P1 record that must be ignored."""
    records = [b_record(P[j], {0: float(j), 1: -float(j), 4095: 1.0}, fmt) for j in range(1, 5)]
    records.insert(2, b_record(X, {0: 9.0}, fmt))
    records.append(b_record(P[1], {0: 100.0}, fmt))
    return b''.join(records)


@pytest.fixture(scope='module')
def raw_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('amazon_raw')
    rows = fixture_rows()
    write(d / 'ratings_Baby.csv', ratings_csv(rows))
    write(d / 'ratings_Baby.csv.gz', ratings_csv(rows), gz=True)
    write(d / 'Baby.csv.gz', ratings_csv(rows, '2018'), gz=True)
    write(d / 'reviews_Baby_5.json', reviews_jsonl(rows))
    write(d / 'meta_Baby.json.gz', ''.join(repr(m) + '\n' for m in META_2014), gz=True)
    write(d / 'meta_Baby_2018.json', ''.join(json.dumps(m) + '\n' for m in META_2018))
    (d / 'image_features_Baby.b').write_bytes(image_bytes())
    return d


def run_amazon(raw_dir, out_dir, name, *extra, interactions_file='ratings_Baby.csv',
               meta='meta_Baby.json.gz', image='image_features_Baby.b'):
    argv = ['--interactions', str(raw_dir / interactions_file), '--meta', str(raw_dir / meta),
            '--out_dir', str(out_dir), '--name', name, '--encoder', 'hashing', '--quiet']
    if image:
        argv += ['--image_features', str(raw_dir / image)]
    assert amazon.main(argv + list(extra)) == 0
    folder = Path(out_dir) / name
    return folder, json.loads((folder / 'manifest.json').read_text())


def read_inter(folder, name):
    lines = (folder / f'{name}.inter').read_text().splitlines()
    assert lines[0] == 'userID\titemID\trating\ttimestamp\tx_label'
    return [ln.split('\t') for ln in lines[1:]]


@pytest.fixture(scope='module')
def baby(raw_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('amazon_out')
    return run_amazon(raw_dir, out, 'baby')


# ----------------------------------------------------------------------------- the command


def test_five_core_counts_follow_the_hand_worked_cascade(baby):
    folder, manifest = baby
    fixes, counts = manifest['fixes'], manifest['counts']
    assert fixes['rows_read'] == 48
    assert fixes['items_without_metadata_dropped'] == 1          # Z
    assert fixes['rows_of_items_without_metadata'] == 5
    assert fixes['rows_before_duplicates_and_kcore'] == 43
    assert fixes['duplicate_rows_same_time'] == 1                 # (C4, P2)
    assert fixes['duplicate_rows_later_time'] == 1                # (C5, P3) at 500
    assert fixes['kcore_rows_dropped'] == 16
    assert fixes['kcore_users_dropped'] == 2                      # W, V
    assert fixes['kcore_items_dropped'] == 2                      # X, Y
    assert (counts['n_users'], counts['n_items'], counts['n_interactions']) == (5, 5, 25)
    assert (counts['n_train'], counts['n_valid'], counts['n_test']) == (15, 5, 5)
    assert counts['sparsity'] == 0.0


def test_per_user_chronological_split_and_rows(baby):
    folder, _ = baby
    rows = read_inter(folder, 'baby')
    got = {}
    for u, i, r, t, label in rows:
        got[(int(u), int(i))] = (float(r), int(t), int(label))
    for ui in range(5):                                           # user id ui is C_{ui+1}
        i = ui + 1
        for j in range(1, 6):
            rating, t, label = got[(ui, j - 1)]
            expected_t = T0 + (50 if (i, j) == (5, 3) else TIMES[i][j - 1])
            assert (t, label) == (expected_t, LABELS[i][j - 1]), (i, j)
            # (C5, P3) keeps its earliest row, the duplicate rated 5.0.
            assert rating == (5.0 if (i + j) % 2 or (i, j) == (5, 3) else 4.0)
    # Rows are grouped by user and in time order within a user.
    keys = [(int(u), int(t)) for u, _, _, t, _ in rows]
    assert keys == sorted(keys)


def test_id_maps(baby):
    folder, _ = baby
    assert (folder / 'i_id_mapping.csv').read_text().splitlines() == \
        ['asin\titemID'] + [f'{P[j]}\t{j - 1}' for j in range(1, 6)]
    assert (folder / 'u_id_mapping.csv').read_text().splitlines() == \
        ['user_id\tuserID'] + [f'{C[i]}\t{i - 1}' for i in range(1, 6)]


def test_text_feature_rows_follow_item_order(baby):
    folder, manifest = baby
    text = np.load(folder / 'text_feat.npy')
    enc = HashingEncoder(384)
    assert text.shape == (5, 384) and text.dtype == np.float32
    for i, t in enumerate(TEXTS[:4]):
        np.testing.assert_array_equal(text[i], enc.encode_one(t))
    # P5's title is empty: the mean of the other four rows.
    np.testing.assert_allclose(text[4], text[:4].astype(np.float64).mean(0), rtol=1e-6)
    assert manifest['fixes']['items_with_empty_text_mean_text'] == 1


def test_item_texts_are_kept_for_the_mllmrec_stage(baby):
    folder, _ = baby
    lines = [json.loads(x) for x in (folder / 'item_text.jsonl').read_text().splitlines()]
    # The text each text_feat row was encoded from, itemID order; P5's empty text is left out.
    assert lines == [{'item_id': P[j + 1], 'text': t} for j, t in enumerate(TEXTS[:4])]
    enc = HashingEncoder(384)
    text = np.load(folder / 'text_feat.npy')
    for i, line in enumerate(lines):
        np.testing.assert_array_equal(text[i], enc.encode_one(line['text']))


def test_image_features_follow_item_order_with_mean_row(baby):
    folder, manifest = baby
    img = np.load(folder / 'image_feat.npy')
    assert img.shape == (5, 4096)
    for j in range(1, 5):
        assert (img[j - 1, 0], img[j - 1, 1], img[j - 1, 4095]) == (j, -j, 1.0)
    # P5 has no record: the mean of P1..P4 = (2.5, -2.5, ..., 1.0).
    assert (img[4, 0], img[4, 1], img[4, 4095]) == (2.5, -2.5, 1.0)
    assert not img[:, 2:4095].any()
    assert manifest['fixes']['image_rows_mean_filled'] == 1
    assert manifest['fixes']['image_duplicate_records_ignored'] == 1
    assert manifest['fixes']['image_records_in_file'] == 6


def test_manifest_hashes_options_and_loader(baby):
    folder, manifest = baby
    import hashlib
    for name, entry in manifest['outputs'].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry['sha256']
    assert set(manifest['outputs']) == {'baby.inter', 'image_feat.npy', 'text_feat.npy',
                                        'i_id_mapping.csv', 'u_id_mapping.csv',
                                        'item_text.jsonl'}
    assert manifest['options']['k'] == 5 and manifest['options']['split'] == '0.8,0.1,0.1'
    assert manifest['encoder'] == {'name': 'hashing', 'dim': 384}
    ds = data_lib.load_mmrec(folder.parent, 'baby', cache_dir=str(folder.parent / 'cache'))
    assert (ds.n_users, ds.n_items, ds.train.users.size) == (5, 5, 15)


def test_other_formats_give_identical_output(raw_dir, baby, tmp_path):
    folder, _ = baby
    reference = (folder / 'baby.inter').read_bytes(), np.load(folder / 'text_feat.npy')
    for name, inter, extra, meta in (
            ('gz2014', 'ratings_Baby.csv.gz', [], 'meta_Baby.json.gz'),
            ('csv2018', 'Baby.csv.gz', ['--version', '2018'], 'meta_Baby_2018.json'),
            ('reviews', 'reviews_Baby_5.json', [], 'meta_Baby_2018.json')):
        other, manifest = run_amazon(raw_dir, tmp_path, name, *extra, interactions_file=inter,
                                     meta=meta, image=None)
        assert (other / f'{name}.inter').read_bytes() == reference[0], name
        np.testing.assert_array_equal(np.load(other / 'text_feat.npy'), reference[1])
        assert not (other / 'image_feat.npy').exists()


def test_items_without_metadata_can_be_kept_with_the_mean_text(raw_dir, tmp_path):
    folder, manifest = run_amazon(raw_dir, tmp_path, 'keep', '--items_without_meta', 'mean',
                                  image=None)
    # Z is kept: rated by C1..C5, it survives the 5-core as item 5 (sorted last).
    assert manifest['counts']['n_items'] == 6
    assert manifest['fixes']['items_without_metadata_kept_mean_text'] == 1
    text = np.load(folder / 'text_feat.npy').astype(np.float64)
    # Rows 4 (P5, empty text) and 5 (Z, no metadata) are both the mean of rows 0..3.
    np.testing.assert_allclose(text[5], text[:4].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(text[4], text[5])


def test_a_2018_file_read_as_2014_is_an_error(raw_dir, tmp_path):
    with pytest.raises(DataError, match='--version'):
        amazon.main(['--interactions', str(raw_dir / 'Baby.csv.gz'), '--meta',
                     str(raw_dir / 'meta_Baby.json.gz'), '--out_dir', str(tmp_path),
                     '--name', 'x', '--encoder', 'hashing', '--quiet'])


def test_existing_output_is_never_overwritten_silently(raw_dir, baby):
    folder, _ = baby
    with pytest.raises(DataError, match='--overwrite'):
        run_amazon(raw_dir, folder.parent, 'baby')


# ----------------------------------------------------------------------------- readers


def test_b_reader_against_hand_written_bytes(raw_dir):
    rows, present, counts = amazon.read_image_features(
        raw_dir / 'image_features_Baby.b', [P[3], P[5], P[1], 'B0000000NO'], progress=False)
    assert present.tolist() == [True, False, True, False]
    assert (rows[0, 0], rows[0, 1], rows[0, 4095]) == (3.0, -3.0, 1.0)
    assert rows[2, 0] == 1.0                      # the first P1 record, not the later 100.0
    assert not rows[1].any() and not rows[3].any()
    assert counts['image_duplicate_records_ignored'] == 1 and counts['image_rows_found'] == 2


def test_b_reader_byte_order(tmp_path):
    big = tmp_path / 'big.b'
    big.write_bytes(image_bytes('>'))
    with pytest.raises(DataError, match='--image_byte_order big'):
        amazon.read_image_features(big, [P[1]], progress=False)
    rows, present, _ = amazon.read_image_features(big, [P[2]], byte_order='big', progress=False)
    assert present[0] and (rows[0, 0], rows[0, 1]) == (2.0, -2.0)


def test_b_reader_rejects_truncated_files_and_bad_asins(tmp_path):
    path = tmp_path / 'cut.b'
    path.write_bytes(image_bytes()[:-100])
    with pytest.raises(DataError, match=r'not a whole number of 16394-byte records.*byte 81970'):
        amazon.read_image_features(path, [P[1]], progress=False)
    bad = tmp_path / 'bad.b'
    bad.write_bytes(b_record(P[1], {0: 1.0}) + b'\xff' * 10 + b'\0' * 16384)
    with pytest.raises(DataError, match=r'record 1 \(byte offset 16394\)'):
        amazon.read_image_features(bad, [P[1]], progress=False)


def test_b_reader_counts_nonfinite_and_zero_rows(tmp_path):
    path = tmp_path / 'odd.b'
    path.write_bytes(b_record(P[1], {0: 1.0}) + b_record(P[2], {5: float('nan')})
                     + b_record(P[3], {}))
    _, present, counts = amazon.read_image_features(path, [P[1], P[2], P[3]], progress=False)
    assert present.tolist() == [True, False, False]
    assert (counts['image_rows_nonfinite'], counts['image_rows_all_zero']) == (1, 1)


def test_python_literal_metadata_parser():
    line = ("{'asin': '0000031852', 'title': \"Men's Tutu\", 'price': 3.17, 'related': "
            "{'also_bought': ['B00JHONN1S']}, 'categories': [['Clothing', 'Men'], ['Dance']], "
            "'description': 'Line one\\nline two'}")
    record = parse_record(line)
    assert record['related'] == {'also_bought': ['B00JHONN1S']} and record['price'] == 3.17
    assert amazon.item_text(record) == "Men's Tutu Clothing Men Line one line two"
    assert parse_record('{"asin": "B1", "category": ["A", "B"]}')['category'] == ['A', 'B']
    # Python-literal lines are evaluated as literals only: code is never run.
    with pytest.raises(ValueError, match='neither JSON nor a Python literal'):
        parse_record("{'asin': __import__('os').system('echo owned')}")
    with pytest.raises(ValueError, match='list, not an object'):
        parse_record('[1, 2]')


def test_malformed_lines_are_reported_with_line_numbers(tmp_path, raw_dir):
    rows = fixture_rows()
    text = ratings_csv(rows).splitlines(keepends=True)
    text.insert(3, 'AC9,B0000000P1,5.0\n')                  # line 4: three fields
    text.insert(6, 'AC9,B0000000P1,five,1300000000\n')      # line 7: not a number
    bad = write(tmp_path / 'bad.csv', ''.join(text))
    argv = ['--interactions', str(bad), '--meta', str(raw_dir / 'meta_Baby.json.gz'),
            '--out_dir', str(tmp_path / 'out'), '--name', 'bad', '--encoder', 'hashing',
            '--quiet']
    with pytest.raises(DataError, match=r'bad\.csv, line 4: 3 comma-separated fields'):
        amazon.main(argv)
    assert amazon.main(argv + ['--skip_malformed']) == 0
    manifest = json.loads((tmp_path / 'out' / 'bad' / 'manifest.json').read_text())
    assert manifest['fixes']['malformed_lines_skipped'] == 2
    first = manifest['malformed_lines']['bad.csv']['first']
    assert [f.split(':')[0] for f in first] == ['line 4', 'line 7']
    # The same interactions remain: the same dataset as the clean file.
    assert manifest['counts']['n_interactions'] == 25


def test_malformed_metadata_line_is_reported(tmp_path):
    meta = write(tmp_path / 'meta.json', "{'asin': 'B0000000P1', 'title': 'ok'}\n"
                                         "{'asin': 'B0000000P2', 'title': 'unclosed\n")
    with pytest.raises(DataError, match=r'meta\.json, line 2: not a metadata record'):
        amazon.read_metadata(meta, {P[1], P[2]}, LineErrors(), progress=False)
    errors = LineErrors(skip=True)
    texts, _ = amazon.read_metadata(meta, {P[1], P[2]}, errors, progress=False)
    assert texts == {P[1]: 'ok'} and errors.counts == {'meta.json': 1}


def test_truncated_gzip_is_an_error(tmp_path):
    data = gzip.compress(ratings_csv(fixture_rows()).encode())
    cut = tmp_path / 'cut.csv.gz'
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r'cut\.csv\.gz: the gzip stream is truncated'):
        amazon.read_ratings_csv(cut, LineErrors(), columns=amazon.CSV_COLUMNS['2014'],
                                progress=False)


def test_k_core_unit():
    # The cascade above, as codes: users C1..C5 = 0..4, W = 5, V = 6; P1..P5 = 0..4, X = 5, Y = 6.
    pairs = [(i, j) for i in range(5) for j in range(5)] + [(i, 5) for i in (0, 1, 2)] \
        + [(i, 6) for i in (0, 1, 2)] + [(5, j) for j in (5, 0, 1, 2, 6)] \
        + [(6, j) for j in (6, 0, 1, 2, 3)]
    users, items = (np.array(c) for c in zip(*pairs))
    keep = interactions.k_core(users, items, 5)
    assert keep.sum() == 25 and set(users[keep]) == set(range(5)) == set(items[keep])
    # With k=4 nothing is below the threshold: all 41 rows stay.
    assert interactions.k_core(users, items, 4).sum() == 41


# ----------------------------------------------------------------------------- end to end


def test_a_built_dataset_trains_with_the_main_command(tmp_path):
    """A larger random fixture (60 items: evaluation needs >= 50) through the command, then a
    1-epoch run of the main command on it."""
    rng = np.random.default_rng(0)
    items = [f'B{n:09d}' for n in range(60)]
    pop = rng.dirichlet(np.full(60, 5.0))
    rows = []
    for u in range(150):
        for i in rng.choice(60, size=10, replace=False, p=pop):
            rows.append((f'A{u:05d}', items[i], 5.0, int(T0 + rng.integers(0, 10 ** 6))))
    raw = tmp_path / 'raw'
    raw.mkdir()
    write(raw / 'r.csv', ratings_csv(rows))
    write(raw / 'm.json', ''.join(repr({'asin': a, 'title': f'item {n % 7} kind {n % 3}'})
                                  + '\n' for n, a in enumerate(items)), gz=False)
    (raw / 'i.b').write_bytes(b''.join(
        b_record(a, {k: float(v) for k, v in enumerate(rng.random(8) + 0.1)}) for a in items))
    folder, manifest = run_amazon(raw, tmp_path / 'data', 'shop', interactions_file='r.csv',
                                  meta='m.json', image='i.b')
    assert manifest['counts']['n_items'] >= 50
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    out = subprocess.run(
        [sys.executable, '-m', 'lirdrec_jax.main', '--config', 'configs/test.py',
         f'--config.data.data_dir={tmp_path / "data"}', '--config.data.dataset=shop',
         f'--config.checkpoint.output_dir={tmp_path / "runs"}', '--config.train.epochs=1'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'lirdrec test recall' in out.stdout
    assert f"{manifest['counts']['n_users']} users, {manifest['counts']['n_items']} items" \
        in out.stdout + out.stderr
