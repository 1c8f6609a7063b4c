"""Tests of DGVAE's word view: the builder (`lirdrec_jax.word_view`) against hand-computed
TF-IDF on a 3-user example, and `python -m data_prep.words` on small dataset folders written
here (item texts by raw or mapped id, image words, training rows only, errors)."""
import json
import math
import re

import numpy as np
import pytest
import scipy.sparse as sp

from data_prep import words
from data_prep.pipeline import main_guard
from lirdrec_jax import word_view

# --------------------------------------------------------------------------- the builder

# Items of the 3-user example. Item 3 is on a valid and a test row only: its words must never
# appear.
ITEM_DOCS = ['Red apple, red!', 'green APPLE', 'a B c-dd Dd', 'banana secret']
# (user, item) training rows; user 2 lists item 2 twice (MMRec keeps duplicates: it counts
# twice).
TRAIN = [(0, 0), (0, 1), (1, 1), (2, 2), (2, 2)]
HELD_OUT = [(1, 3), (0, 3)]          # valid, test


def hand_view():
    """The 3-user example worked out by hand.

    Tokens (lower-cased, 2+ word characters): u0 = red apple red green apple, u1 = green apple,
    u2 = dd dd dd dd ('a', 'b', 'c' are single characters). Vocabulary in code-point order:
    apple, dd, green, red; document frequencies 2, 1, 2, 1 over n = 3 users, so
    idf(apple) = idf(green) = ln(4/3) + 1 and idf(dd) = idf(red) = ln(4/2) + 1.
    """
    a, b = math.log(4 / 3) + 1, math.log(2) + 1
    u0 = np.array([2 * a, 0, a, 2 * b])            # apple 2, green 1, red 2
    u1 = np.array([a, 0, a, 0])                    # apple 1, green 1
    u2 = np.array([0, 4 * b, 0, 0])                # dd 4
    rows = [r / math.sqrt(sum(x * x for x in r)) for r in (u0, u1, u2)]
    return ('apple', 'dd', 'green', 'red'), np.array([a, b, a, b]), np.stack(rows)


def build(rows=TRAIN, **kw):
    users, items = np.array(rows).T
    return word_view.build_word_view(ITEM_DOCS, users, items, 3, **{'min_df': 1, 'max_df': 1.0,
                                                                      **kw})


def test_tfidf_matches_the_hand_computation():
    vocab, idf, dense = hand_view()
    view = build()
    assert view.vocabulary == vocab
    np.testing.assert_allclose(view.idf, idf, rtol=1e-15)
    assert view.matrix.dtype == np.float32 and view.matrix.shape == (3, 4)
    assert isinstance(view.matrix, sp.csr_matrix) and view.matrix.has_sorted_indices
    np.testing.assert_allclose(view.matrix.toarray(), dense, rtol=1e-6)
    # Must fail: without idf (plain normalised counts) the first row is another vector.
    counts = np.array([2.0, 0, 1, 2])
    assert not np.allclose(view.matrix.toarray()[0], counts / np.linalg.norm(counts), rtol=1e-3)


def test_held_out_items_never_contribute():
    _, _, dense = hand_view()
    view = build()
    # Must fail: a view built from every row (valid and test too) has other words and rows.
    leaky = build(TRAIN + HELD_OUT)
    assert 'banana' in leaky.vocabulary and 'banana' not in view.vocabulary
    assert leaky.matrix.shape != view.matrix.shape or not np.allclose(
        leaky.matrix.toarray(), dense, rtol=1e-6)


@pytest.mark.parametrize('min_df, max_df, kept', [
    (2, 1.0, ('apple', 'green')),          # df >= 2 documents
    (1, 0.5, ('dd', 'red')),               # df <= 0.5 * 3 = 1.5 documents
    (1, 1, ('dd', 'red')),                 # an int max_df counts documents
    (0.6, 1.0, ('apple', 'green')),        # a float min_df is a fraction: df >= 1.8
])
def test_document_frequency_bounds(min_df, max_df, kept):
    view = build(min_df=min_df, max_df=max_df)
    assert view.vocabulary == kept
    # The idf keeps n = 3 and each kept word's df; rows are renormalised over the kept words.
    _, idf, _ = hand_view()
    full = ('apple', 'dd', 'green', 'red')
    np.testing.assert_allclose(view.idf, [idf[full.index(w)] for w in kept], rtol=1e-15)
    norms = np.linalg.norm(view.matrix.toarray(), axis=1)
    np.testing.assert_allclose(norms[norms > 0], 1.0, rtol=1e-6)


def test_bounds_that_keep_nothing_or_contradict_are_errors():
    with pytest.raises(ValueError, match='no word is left'):
        build(min_df=3)
    with pytest.raises(ValueError, match='expected max_df >= min_df'):
        build(min_df=3, max_df=0.5)
    with pytest.raises(ValueError, match='fraction in'):
        build(max_df=1.5)


def test_tokenizer_and_first_words():
    assert word_view.tokenize('Ünïcode Straße x_y 42 a é-tude, 日本語!') == [
        'ünïcode', 'straße', 'x_y', '42', 'tude', '日本語']
    text = ' babybook journal organizer layette diaper piddlepad diapering'
    assert word_view.first_words(text, 5) == 'babybook journal organizer layette diaper'
    assert word_view.first_words(text, 0) == text.strip()
    assert word_view.first_words(None, 5) == '' and word_view.first_words(' ', 5) == ''


def test_fused_joins_reproduce_the_reference_concatenation():
    docs = ['tea cup', 'Mug set']
    assert word_view.item_document('tea cup', 'kettle spoon', 1) == 'tea cup kettle'
    assert word_view.item_document('tea cup', 'kettle spoon', 1, fused_joins=True) == \
        'tea cupkettle'
    users, items = np.array([0, 0, 1, 1, 2, 2, 3]), np.array([0, 1, 0, 1, 0, 1, 1])
    spaced = word_view.build_word_view(docs, users, items, 4, min_df=1, max_df=1.0)
    fused = word_view.build_word_view(docs, users, items, 4, min_df=1, max_df=1.0,
                                      fused_joins=True)
    assert spaced.vocabulary == ('cup', 'mug', 'set', 'tea')
    # Users 0-2 read 'tea cupMug set' (cup and mug fuse); user 3 reads 'Mug set'.
    assert fused.vocabulary == ('cupmug', 'mug', 'set', 'tea')


def test_matches_scikit_learn_when_installed():
    text = pytest.importorskip('sklearn.feature_extraction.text')
    rng = np.random.default_rng(0)
    pool = ['alpha', 'Beta', 'gamma', 'DELTA', 'épée', 'x', 'a1', '__', '42', 'foo-bar', 'naïve',
            'ΟΔΟΣ', 'straße', '日本語', 'ok.']
    docs = [' '.join(rng.choice(pool, rng.integers(0, 12))) for _ in range(40)]
    users, items = rng.integers(0, 30, 400), rng.integers(0, 40, 400)
    users[users == 7] = 8  # user 7 has no training row: an empty document
    for fused in (False, True):
        view = word_view.build_word_view(docs, users, items, 32, min_df=3, max_df=0.9,
                                         fused_joins=fused)
        joiner = '' if fused else ' '
        user_docs = [joiner.join(docs[i] for i in items[users == u]) for u in range(32)]
        ref = text.TfidfVectorizer(min_df=3, max_df=0.9)
        expected = ref.fit_transform(user_docs)
        assert list(ref.get_feature_names_out()) == list(view.vocabulary)
        np.testing.assert_allclose(view.idf, ref.idf_, rtol=1e-12)
        np.testing.assert_allclose(view.matrix.toarray(), expected.toarray(), rtol=1e-6,
                                   atol=1e-7)


def test_vocabulary_file_round_trip(tmp_path):
    view = build()
    word_view.save_word_view(view, tmp_path / 'w.npz', tmp_path / 'v.txt')
    assert (tmp_path / 'v.txt').read_bytes() == b'apple\ndd\ngreen\nred\n'
    assert word_view.read_vocabulary(tmp_path / 'v.txt', 4) == view.vocabulary
    loaded = sp.load_npz(tmp_path / 'w.npz')
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded.toarray(), view.matrix.toarray())
    with pytest.raises(ValueError, match='4 words but the matrix has 5 columns'):
        word_view.read_vocabulary(tmp_path / 'v.txt', 5)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith('.tmp')] == []


# --------------------------------------------------------------------------- the command

ASINS = ['B01', 'B02', 'B03', 'B04', 'B05']
# (user, item, x_label): u0 trains on B01, B02; u1 on B02, B03; u2 on B01, B04; u3 has only a
# test row. B05 is on valid/test rows only.
ROWS = [(0, 0, 0), (0, 1, 0), (0, 4, 1), (0, 2, 2),
        (1, 1, 0), (1, 2, 0), (1, 0, 1), (1, 4, 2),
        (2, 0, 0), (2, 3, 0), (2, 1, 1), (2, 2, 2),
        (3, 4, 2)]
ITEM_TEXT = {'B01': 'Soft cotton blanket', 'B02': 'Wooden toy train', 'B03': 'soft toy bear',
             'B05': 'secret leaked words'}        # B04 has no text
DESCRIPTIONS = {'B01': 'blanket blue folded cosy warm sixthword',
                'B04': 'night lamp white glow round extra'}


def write_jsonl(path, records):
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    return path


@pytest.fixture
def shop(tmp_path):
    """A 4-user, 5-item MMRec folder with an item map and item texts by raw id."""
    folder = tmp_path / 'data' / 'shop'
    folder.mkdir(parents=True)
    (folder / 'shop.inter').write_text('userID\titemID\trating\ttimestamp\tx_label\n' + ''.join(
        f'{u}\t{i}\t5.0\t{n}\t{x}\n' for n, (u, i, x) in enumerate(ROWS)))
    (folder / 'i_id_mapping.csv').write_text(
        'asin\titemID\n' + ''.join(f'{a}\t{i}\n' for i, a in enumerate(ASINS)))
    write_jsonl(folder / 'item_text.jsonl', [{'item_id': k, 'text': t}
                                             for k, t in ITEM_TEXT.items()])
    return folder


def run(folder, *args):
    argv = ['--data_dir', str(folder.parent), '--dataset', folder.name, '--quiet',
            '--min_df', '1', '--max_df', '1.0', *args]
    assert words.main(argv) == 0
    matrix = sp.load_npz(folder / word_view.WORDS_FILE)
    vocab = word_view.read_vocabulary(folder / word_view.VOCAB_FILE, matrix.shape[1])
    manifest = json.loads((folder / 'user_words_tfidf.manifest.json').read_text())
    return matrix, vocab, manifest


def expected_view(docs_by_item, rows, n_users=4):
    train = [(u, i) for u, i, x in rows if x == 0]
    users, items = np.array(train).T
    return word_view.build_word_view(docs_by_item, users, items, n_users, min_df=1, max_df=1.0)


def test_command_builds_from_training_items_only(shop, capsys):
    matrix, vocab, manifest = run(shop)
    docs = [ITEM_TEXT.get(a, '') for a in ASINS]
    want = expected_view(docs, ROWS)
    assert vocab == want.vocabulary
    assert 'secret' not in vocab and 'leaked' not in vocab
    np.testing.assert_array_equal(matrix.toarray(), want.matrix.toarray())
    assert matrix.dtype == np.float32 and matrix.shape == (4, len(vocab))
    assert not matrix.toarray()[3].any()  # u3: no training row
    # Must fail: the same build over every row (valid and test too) is another matrix.
    leaky = expected_view(docs, [(u, i, 0) for u, i, _ in ROWS])
    assert leaky.vocabulary != vocab
    counts = manifest['counts']
    assert counts['items_without_text'] == 1 and counts['empty_documents'] == 1
    assert counts['training_rows_of_items_without_words'] == 1   # u2's B04
    assert manifest['output'][word_view.WORDS_FILE]['shape'] == [4, len(vocab)]
    err = capsys.readouterr().err
    assert '1 of 5 items have no text' in err and '1 user(s) have no training row' in err


def test_image_words_are_the_first_five_of_each_description(shop, tmp_path):
    desc = write_jsonl(tmp_path / 'captions.jsonl', [{'asin': k, 'text': t}
                                                     for k, t in DESCRIPTIONS.items()])
    matrix, vocab, manifest = run(shop, '--descriptions', str(desc), '--overwrite')
    assert {'cosy', 'warm', 'night', 'glow'} <= set(vocab)
    assert 'sixthword' not in vocab and 'extra' not in vocab
    docs = [word_view.item_document(ITEM_TEXT.get(a), DESCRIPTIONS.get(a)) for a in ASINS]
    np.testing.assert_array_equal(matrix.toarray(), expected_view(docs, ROWS).matrix.toarray())
    assert manifest['counts']['items_text_and_image_words'] == 1
    assert manifest['counts']['items_image_words_only'] == 1
    matrix, vocab, _ = run(shop, '--descriptions', str(desc), '--image_words', '0',
                           '--overwrite')
    assert 'sixthword' in vocab


def test_item_texts_by_mapped_id_without_a_map(shop, tmp_path):
    (shop / 'i_id_mapping.csv').unlink()
    write_jsonl(shop / 'item_text.jsonl', [{'itemID': ASINS.index(k), 'text': t}
                                           for k, t in ITEM_TEXT.items()])
    matrix, vocab, _ = run(shop)
    want = expected_view([ITEM_TEXT.get(a, '') for a in ASINS], ROWS)
    assert vocab == want.vocabulary
    np.testing.assert_array_equal(matrix.toarray(), want.matrix.toarray())
    # Raw ids without a map are the mapped ids, as strings.
    write_jsonl(shop / 'item_text.jsonl', [{'item_id': str(ASINS.index(k)), 'text': t}
                                           for k, t in ITEM_TEXT.items()])
    matrix2, _, _ = run(shop, '--overwrite')
    np.testing.assert_array_equal(matrix2.toarray(), matrix.toarray())


def test_command_errors_name_the_file_and_what_to_provide(shop, tmp_path, capsys):
    argv = ['--data_dir', str(shop.parent), '--dataset', 'shop', '--quiet']
    (shop / 'item_text.jsonl').rename(tmp_path / 'kept.jsonl')
    assert main_guard(words.main, argv) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'item_text.jsonl does not exist' in err
    assert '--item_text FILE.jsonl' in err and 'data_prep.amazon' in err
    cases = [
        ([{'item_id': 'B01', 'text': 'ok'}, {'itemID': 9, 'text': 'x'}],
         r'bad.jsonl, line 2: field itemID is 9; expected a mapped item id in 0..4'),
        ([{'item_id': 'B01', 'text': None}], r'bad.jsonl, line 1: field text is None'),
        ([{'item_id': 'Z9', 'text': 'x'}], r'bad.jsonl: none of its 1 item ids is a raw item '
                                           r'id of i_id_mapping.csv'),
    ]
    for records, message in cases:
        bad = write_jsonl(tmp_path / 'bad.jsonl', records)
        assert main_guard(words.main, argv + ['--item_text', str(bad)]) == 1
        assert len(re.findall(message, capsys.readouterr().err)) == 1, message
    good = str(tmp_path / 'kept.jsonl')
    assert main_guard(words.main, argv + ['--item_text', good, '--min_df', '4',
                                          '--max_df', '1.0']) == 1
    assert 'no word is left' in capsys.readouterr().err   # u3's document is empty
    assert main_guard(words.main, argv + ['--item_text', good, '--min_df', '3']) == 1
    assert 'expected max_df >= min_df (--min_df 3, --max_df 0.6)' in capsys.readouterr().err
    assert main_guard(words.main, argv + ['--item_text', good, '--max_df', '2.5']) == 1
    assert "error: --max_df '2.5'" in capsys.readouterr().err
    assert main_guard(words.main, argv + ['--item_text', good, '--min_df', '1']) == 0
    assert main_guard(words.main, argv + ['--item_text', good, '--min_df', '1']) == 1
    assert 'already exists; pass --overwrite' in capsys.readouterr().err


def test_in_memory_datasets_get_the_view_from_the_builder_not_a_stand_in():
    from lirdrec_jax import model_inputs, synthetic
    from lirdrec_jax.data import DataError
    from lirdrec_jax.models.base import InputFile
    data = synthetic.generate_synthetic(n_users=200, n_items=120, image_dim=8, text_dim=8)
    ds = synthetic.to_dataset(data, 'small')
    with pytest.raises(DataError, match=r'reads a sparse input file \(data\.words_file\), which '
                                        r'has no stand-in'):
        model_inputs.with_no_llm_inputs(ds, (InputFile('words_file', 'users', '', 'sparse'),))
    view = word_view.build_word_view(list(data.item_text), ds.train.users, ds.train.items,
                                     ds.n_users)
    assert view.matrix.shape[0] == ds.n_users and view.stats['empty_documents'] == 0
