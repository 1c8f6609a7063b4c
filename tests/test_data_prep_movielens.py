"""Tests of `python -m data_prep.movielens` and of the shared split rules, on fixture files
written here in the 100K, 1M and ml-latest layouts (no downloads)."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from data_prep import interactions, movielens
from data_prep.encoders import HashingEncoder
from data_prep.interactions import InteractionLog
from data_prep.readers import LineErrors
from lirdrec_jax.data import DataError

# ----------------------------------------------------------------------------- the fixture
#
# Core movies 2, 5, 7, 10, 30, 100; movie 99 is sparse; movie 555 has no metadata.
#   users 1..7 rate the 6 core movies (user 7 rates movie 30 with 3: below --min_rating 4);
#   users 1, 2, 3 rate 99 with 4; users 1..5 rate 555 with 5;
#   user 8 rates 99, 2, 10, 100 with 5 and 5, 7, 30 with 2.
# 42 + 3 + 5 + 7 = 57 rows.
#   min_rating 4: user 7's movie 30 and user 8's three low rows go -> 53;
#   555 has no metadata: its 5 rows go -> 48;
#   5-core: user 8 has 4 rows and movie 99 has 4 raters (1, 2, 3, 8): their 7 rows go -> 41;
#   then users 1..6 have 6 rows, user 7 has 5, every core movie >= 6 raters: stable.
# Split: 6 rows -> 1 valid, 1 test (round(0.6) = 1), 4 train; user 7: 1, 1, 3.
CORE = (2, 5, 7, 10, 30, 100)
T0 = 880_000_000


def fixture_ratings():
    """(user, movie, rating, timestamp) rows in file order; each user's core movies are rated
    in a user-specific order, so that the chronological split is not the movie order."""
    rows = []
    for u in range(1, 8):
        order = CORE[u % 6:] + CORE[:u % 6]              # user u starts at a different movie
        for n, m in enumerate(order):
            rows.append((u, m, 3 if (u, m) == (7, 30) else 4 + (m + u) % 2, T0 + 1000 * u + n))
    rows += [(u, 99, 4, T0 + 50_000 + u) for u in (1, 2, 3)]
    rows += [(u, 555, 5, T0 + 60_000 + u) for u in range(1, 6)]
    rows += [(8, m, 5, T0 + 70_000 + m) for m in (99, 2, 10, 100)]
    rows += [(8, m, 2, T0 + 80_000 + m) for m in (5, 7, 30)]
    return rows


# (title as the file writes it, genres); movie 7 has no year in its 100K title: the release
# date gives it. Texts expected by hand, for the 100K files:
MOVIES = {2: ('GoldenEye (1995)', ['Action', 'Adventure', 'Thriller']),
          5: ('American President, The (1995)', ['Comedy', 'Drama', 'Romance']),
          7: ('Twelve Monkeys', ['Drama', 'Sci-Fi']),
          10: ('Richard III (1995)', ['Drama', 'War']),
          30: ('Misérables, Les (1995)', ['Drama']),
          100: ('Fargo (1996)', ['Crime', 'Drama', 'Thriller']),
          99: ('Sparse Film (1990)', ['Comedy'])}
TEXTS_100K = {2: 'GoldenEye (1995). Genres: Action, Adventure, Thriller',
              5: 'The American President (1995). Genres: Comedy, Drama, Romance',
              7: 'Twelve Monkeys (1995). Genres: Drama, Sci-Fi',
              10: 'Richard III (1995). Genres: Drama, War',
              30: 'Misérables, Les (1995). Genres: Drama',
              100: 'Fargo (1996). Genres: Crime, Drama, Thriller'}


def u_item_line(movie, title, genres):
    flags = ['1' if g in genres else '0' for g in movielens.ML100K_GENRES]
    return f'{movie}|{title}|01-Jan-1995||http://imdb/x|' + '|'.join(flags)


def write_100k(d: Path):
    d.mkdir()
    (d / 'u.data').write_text(''.join(f'{u}\t{m}\t{r}\t{t}\n' for u, m, r, t in
                                      fixture_ratings()))
    # u.item is Latin-1, like the real file ('é' is one byte, 0xE9).
    (d / 'u.item').write_bytes('\n'.join(u_item_line(m, t, g) for m, (t, g) in MOVIES.items())
                               .encode('latin-1') + b'\n')
    (d / 'u.genre').write_text(''.join(f'{g}|{i}\n' for i, g in
                                       enumerate(movielens.ML100K_GENRES)))
    return d


def write_1m(d: Path):
    d.mkdir()
    (d / 'ratings.dat.gz').write_bytes(gzip.compress(''.join(
        f'{u}::{m}::{r}::{t}\n' for u, m, r, t in fixture_ratings()).encode()))
    (d / 'movies.dat').write_bytes(''.join(
        f'{m}::{t if "(" in t else t + " (1995)"}::{"|".join(g)}\n'
        for m, (t, g) in MOVIES.items()).encode('latin-1'))
    return d


def write_latest(d: Path):
    d.mkdir()
    (d / 'ratings.csv').write_text('userId,movieId,rating,timestamp\n' + ''.join(
        f'{u},{m},{float(r)},{t}\n' for u, m, r, t in fixture_ratings()))
    lines = ['movieId,title,genres']
    for m, (t, g) in MOVIES.items():
        t = t if '(' in t else t + ' (1995)'
        lines.append(f'{m},"{t}",{"|".join(g)}' if ',' in t else f'{m},{t},{"|".join(g)}')
    (d / 'movies.csv').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return d


def run(input_dir, out_dir, name, *extra):
    argv = ['--input_dir', str(input_dir), '--out_dir', str(out_dir), '--name', name,
            '--encoder', 'hashing', '--quiet', *extra]
    assert movielens.main(argv) == 0
    folder = Path(out_dir) / name
    return folder, json.loads((folder / 'manifest.json').read_text())


def inter_rows(folder, name):
    lines = (folder / f'{name}.inter').read_text().splitlines()
    return np.array([[float(x) for x in ln.split('\t')] for ln in lines[1:]])


@pytest.fixture(scope='module')
def ml100k(tmp_path_factory):
    root = tmp_path_factory.mktemp('ml')
    return run(write_100k(root / 'ml-100k'), root / 'out', 'ml100k')


# ----------------------------------------------------------------------------- the command


def test_counts_after_threshold_metadata_and_five_core(ml100k):
    _, manifest = ml100k
    fixes, counts = manifest['fixes'], manifest['counts']
    assert fixes['rows_read'] == 57
    assert fixes['rows_below_min_rating'] == 4
    assert fixes['items_without_metadata_dropped'] == 1                    # movie 555
    assert fixes['rows_of_items_without_metadata'] == 5
    assert fixes['rows_before_duplicates_and_kcore'] == 48
    assert fixes['kcore_rows_dropped'] == 7
    assert (fixes['kcore_users_dropped'], fixes['kcore_items_dropped']) == (1, 1)  # 8, 99
    assert (counts['n_users'], counts['n_items'], counts['n_interactions']) == (7, 6, 41)
    assert (counts['n_train'], counts['n_valid'], counts['n_test']) == (27, 7, 7)
    assert manifest['options']['min_rating'] == 4.0
    assert manifest['options']['variant_used'] == '100k'


def test_split_proportions_per_user_are_chronological(ml100k):
    folder, _ = ml100k
    rows = inter_rows(folder, 'ml100k')
    for u in range(7):
        mine = rows[rows[:, 0] == u]
        labels = mine[:, 4].astype(int)
        n = mine.shape[0]
        assert n == (5 if u == 6 else 6)
        assert np.bincount(labels, minlength=3).tolist() == [n - 2, 1, 1]
        times = mine[:, 3]
        assert (np.diff(times) > 0).all()                       # written in time order
        assert labels[-1] == 2 and labels[-2] == 1              # latest = test, before = valid


def test_ids_are_numbered_in_numeric_order(ml100k):
    folder, _ = ml100k
    # String order would put 10 and 100 before 2.
    assert (folder / 'i_id_mapping.csv').read_text().splitlines() == \
        ['movieId\titemID'] + [f'{m}\t{i}' for i, m in enumerate(CORE)]
    assert (folder / 'u_id_mapping.csv').read_text().splitlines() == \
        ['userId\tuserID'] + [f'{u}\t{u - 1}' for u in range(1, 8)]


def test_text_features_from_title_year_genres_in_item_order(ml100k):
    folder, _ = ml100k
    text = np.load(folder / 'text_feat.npy')
    enc = HashingEncoder(384)
    for i, m in enumerate(CORE):
        np.testing.assert_array_equal(text[i], enc.encode_one(TEXTS_100K[m]))
    # The same texts are kept, by raw movie id, for `python -m data_prep.mllmrec`.
    lines = [json.loads(x) for x in (folder / 'item_text.jsonl').read_text().splitlines()]
    assert lines == [{'item_id': str(m), 'text': TEXTS_100K[m]} for m in CORE]


def test_1m_and_latest_layouts_give_the_same_interactions(ml100k, tmp_path):
    folder, _ = ml100k
    reference = (folder / 'ml100k.inter').read_bytes()
    for name, writer_fn in (('ml1m', write_1m), ('latest', write_latest)):
        other, manifest = run(writer_fn(tmp_path / name), tmp_path / 'out', name)
        assert (other / f'{name}.inter').read_bytes() == reference, name
        assert manifest['options']['variant_used'] == {'ml1m': '1m', 'latest': 'latest'}[name]


def test_movie_files_of_each_layout(tmp_path):
    errors = LineErrors()
    texts, _ = movielens.read_movies(write_1m(tmp_path / 'a') / 'movies.dat', '1m', errors,
                                     progress=False)
    assert texts[5] == 'The American President (1995). Genres: Comedy, Drama, Romance'
    assert texts[30] == 'Misérables, Les (1995). Genres: Drama'       # Latin-1 decoded
    latest = write_latest(tmp_path / 'b')
    with open(latest / 'movies.csv', 'a') as f:
        f.write('200,Unlisted (2001),(no genres listed)\n')
    texts, _ = movielens.read_movies(latest / 'movies.csv', 'latest', errors, progress=False)
    assert texts[5] == 'The American President (1995). Genres: Comedy, Drama, Romance'
    assert texts[200] == 'Unlisted (2001)'


def test_half_star_ratings_and_threshold(tmp_path):
    d = tmp_path / 'ml'
    d.mkdir()
    (d / 'ratings.csv').write_text('userId,movieId,rating,timestamp\n1,1,4.5,10\n1,2,3.5,11\n')
    raw, counts = movielens.read_ratings(d / 'ratings.csv', 'latest', LineErrors(),
                                         progress=False)
    assert raw.ratings.tolist() == [4.5, 3.5] and counts == {'header_lines': 1}
    from data_prep.pipeline import filter_min_rating
    kept, dropped = filter_min_rating(raw, 4.0)
    assert kept.ratings.tolist() == [4.5] and dropped == 1


def test_malformed_rating_line_is_reported_with_its_number(tmp_path):
    d = write_100k(tmp_path / 'ml-100k')
    lines = (d / 'u.data').read_text().splitlines()
    lines[2] = '1\t2\t5'                                        # line 3: three fields
    (d / 'u.data').write_text('\n'.join(lines) + '\n')
    with pytest.raises(DataError, match=r'u\.data, line 3: 3 fields separated by'):
        movielens.main(['--input_dir', str(d), '--out_dir', str(tmp_path / 'o'), '--name', 'x',
                        '--encoder', 'hashing', '--quiet'])


def test_unknown_folder_layout_is_a_clear_error(tmp_path):
    (tmp_path / 'readme.txt').write_text('hi')
    with pytest.raises(DataError, match=r"found \['readme.txt'\]; expected u.data \+ u.item"):
        movielens.detect_variant(tmp_path)


def test_split_title():
    assert movielens.split_title('American President, The (1995)') == \
        ('The American President', '1995')
    assert movielens.split_title('City of Lost Children, The (Cité des enfants perdus, La) '
                                 '(1995)') == \
        ('City of Lost Children, The (Cité des enfants perdus, La)', '1995')
    assert movielens.split_title('Babylon 5') == ('Babylon 5', None)


# ----------------------------------------------------------------------------- split rules


def test_temporal_split_rounding_by_hand():
    # n -> (train, valid, test) with 0.1/0.1: n_x = max(1, floor(0.1 n + 0.5)).
    #   3: 0.3 -> 0 -> 1      5: 0.5 -> 1      10: 1.0 -> 1      14: 1.4 -> 1
    #   15: 1.5 -> 2          24: 2.4 -> 2     25: 2.5 -> 3 (half rounds up, not to even)
    expected = {3: (1, 1, 1), 5: (3, 1, 1), 10: (8, 1, 1), 14: (12, 1, 1), 15: (11, 2, 2),
                24: (20, 2, 2), 25: (19, 3, 3)}
    sizes = list(expected)
    users = np.repeat(np.arange(len(sizes)), sizes)
    times = np.concatenate([np.arange(n) for n in sizes])
    labels = interactions.temporal_split(users, times, 0.1, 0.1)
    for u, n in enumerate(sizes):
        got = np.bincount(labels[users == u], minlength=3)
        assert tuple(got) == expected[n], n
        mine = labels[users == u]
        assert (np.diff(mine) >= 0).all()       # train rows first, then valid, then test


def test_parse_split():
    assert interactions.parse_split('8:1:1') == (0.8, 0.1, 0.1)
    assert interactions.parse_split('0.6, 0.2, 0.2') == (0.6, 0.2, 0.2)
    for bad in ('0.8,0.2', '1,0,1', 'a,b,c', '-1,1,1'):
        with pytest.raises(ValueError):
            interactions.parse_split(bad)


def _raw(rows):
    log = InteractionLog()
    for u, i, t in rows:
        log.add(u, i, 5.0, t)
    return log.build()


def test_split_that_leaves_a_user_without_train_rows_is_an_error():
    # 4 rows with 0.45/0.45: round(1.8) = 2 valid + 2 test = 4, no train row.
    raw = _raw([('u1', f'i{j}', j) for j in range(4)])
    with pytest.raises(DataError, match=r"user 'u1' has 4 interactions, all of them valid/test"):
        interactions.prepare_interactions(raw, k=1, valid_ratio=0.45, test_ratio=0.45)


def test_k_below_3_still_gives_users_three_rows_and_counts_the_removed():
    # u1 has 3 rows, u2 has 2: with k=1 u2 would stay, but needs 3 rows to be split.
    raw = _raw([('u1', 'a', 1), ('u1', 'b', 2), ('u1', 'c', 3), ('u2', 'a', 1), ('u2', 'b', 2)])
    split, counts = interactions.prepare_interactions(raw, k=1, valid_ratio=0.1,
                                                      test_ratio=0.1)
    assert split.user_keys == ['u1'] and counts['users_dropped_below_3_rows'] == 1
    assert split.x_label.tolist() == [0, 1, 2]


def test_duplicates_keep_the_earliest_row():
    raw = _raw([('u', 'a', 5), ('u', 'b', 1), ('u', 'a', 2), ('u', 'a', 2)])
    kept, counts = interactions.drop_duplicates(raw)
    assert kept.timestamps.tolist() == [1, 2]           # file order: b@1, then a@2
    # a@5 is a later repeat, the second a@2 an exact one.
    assert counts == {'duplicate_rows_same_time': 1, 'duplicate_rows_later_time': 1}


def test_rating_and_time_parsers():
    from data_prep.readers import parse_rating, parse_timestamp
    assert parse_rating('4.5') == 4.5 and parse_timestamp('1388275200.0') == 1388275200
    for bad in ('nan', 'inf', 'five'):
        with pytest.raises(ValueError):
            parse_rating(bad)
    with pytest.raises(ValueError, match='whole number of seconds'):
        parse_timestamp('12.5')
