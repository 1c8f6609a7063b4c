"""DGVAE's word view for a dataset folder in MMRec layout.

  python -m data_prep.words --data_dir DATA --dataset NAME [options]

writes into DATA/NAME/
  user_words_tfidf.npz     (n_users, n_words) float32 scipy CSR matrix (scipy.sparse.save_npz),
                           row u = user u's L2-normalised TF-IDF over the words of its TRAINING
                           items (--words_output)
  user_words_vocab.txt     the word of each column, one per line, column order (--vocab_output)
  user_words_tfidf.manifest.json   options, definitions, counts, sha256 of both files

The definitions (tokens, document frequency bounds, idf, norm, column order) are those of the
reference's preprocessing notebook, scikit-learn's TfidfVectorizer(min_df=5, max_df=0.6) with
its other options at their defaults; `lirdrec_jax.word_view` states each one and builds the
matrix (scikit-learn is not needed).

One document per user: the documents of the items on the user's TRAINING rows (x_label 0),
once per row. Valid and test rows never contribute. An item's document is its text, then the
first --image_words (default 5, as the reference) words of its image description:
  item text      --item_text FILE.jsonl (default <dataset>/item_text.jsonl, which
                 `data_prep.amazon` and `data_prep.movielens` write: title, brand, first
                 category path, description). Lines {"item_id" (or "asin"): raw id of
                 i_id_mapping.csv, "text": ...} or {"itemID": mapped id, "text": ...}; without
                 an i_id_mapping.csv in the folder a raw id is the mapped id. For a dataset
                 without metadata (e.g. MMRec's preprocessed downloads) write this file from
                 the item metadata yourself.
  image words    --descriptions FILE.jsonl (optional), the format of the description stage of
                 `python -m data_prep.features` ({"item_id" or "asin": raw id, "text": ...}).
                 The reference's image-to-text output is a list of 20 words ranked by CLIP
                 image-word similarity and it keeps the first 5; an MLLM caption starts with a
                 sentence ("The image shows a ..."), whose first 5 words say little:
                 --image_words 0 keeps every word.
An item with neither gets an empty document (counted and warned); a user without training rows
a zero row (counted).

--fused_joins reproduces the reference's concatenation (an item's text and image words, and a
user's items, joined without a separator, so boundary words fuse); the default joins with a
space (docs/reference_quirks.md).

Train (the model reads the matrix as data.words_file):
  python -m lirdrec_jax.main --config dgvae --config.data.data_dir=DATA \\
      --config.data.dataset=NAME
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from data_prep import features, writer
from data_prep.pipeline import main_guard
from data_prep.prepared import RawIds, read_dataset, read_raw_ids
from data_prep.readers import LineErrors, check_file
from lirdrec_jax import word_view
from lirdrec_jax.data import DataError
from lirdrec_jax.mmrec_files import warn

ITEM_TEXT = writer.ITEM_TEXT
ITEM_TEXT_FORMAT = ('JSON lines {"item_id": raw id of i_id_mapping.csv, "text": ...} or '
                    '{"itemID": mapped id, "text": ...}')


# The raw id of each item (i_id_mapping.csv, or the mapped id as a string without one).
ItemIds = RawIds


def _item_of(record: dict, ids: ItemIds) -> Tuple[Optional[int], Optional[str], str]:
    """(mapped item id or None, raw id not in the dataset or None, problem) of one line."""
    n_items = len(ids.raw)
    if 'itemID' in record:
        value = record['itemID']
        if isinstance(value, bool) or not isinstance(value, (int, str)) \
                or not str(value).strip().isdigit():
            return None, None, f'field itemID is {value!r}; expected a mapped item id (an integer)'
        i = int(value)
        if i >= n_items:
            return None, None, (f'field itemID is {i}; expected a mapped item id in '
                                f'0..{n_items - 1} (the .inter file\'s itemID)')
        return i, None, ''
    key = next((record[k] for k in features.ID_KEYS if k in record), None)
    if key is None or isinstance(key, (dict, list, bool)):
        return None, None, 'expected {"item_id" (or "asin"): raw id or "itemID": mapped id, ' \
                           '"text": string}'
    i = ids.index.get(str(key))
    return i, (str(key) if i is None else None), ''


def read_item_texts(path: Path, ids: ItemIds, errors: LineErrors, progress: bool = True
                    ) -> Tuple[Dict[int, str], Dict[str, int]]:
    """mapped item id -> item text from JSON lines (`ITEM_TEXT_FORMAT`). The first text of an
    item wins (later ones are counted); lines of raw ids that are no item of the dataset are
    counted (an error when no line names one)."""
    read = features.read_keyed_texts(path, errors, lambda record: _item_of(record, ids), progress)
    texts, unknown, first_unknown = read.texts, read.unknown, read.first_unknown
    if unknown and not texts:
        where = (f'a raw item id of {features.ITEM_MAP}' if ids.from_map else
                 f'a mapped item id 0..{len(ids.raw) - 1} (the folder has no {features.ITEM_MAP})')
        raise DataError(f'{path}: none of its {unknown} item ids is {where} (first ids in the '
                        f'file: {first_unknown}; in the dataset: {ids.raw[:3]}); expected the '
                        f'item texts of this dataset')
    return texts, {'item_text_duplicates_ignored': read.duplicates,
                   'item_texts_for_unknown_items': unknown}


def read_image_texts(path: Path, ids: ItemIds, errors: LineErrors, progress: bool = True
                     ) -> Tuple[Dict[int, str], Dict[str, int]]:
    """mapped item id -> image description (`features.read_descriptions` format)."""
    by_raw, counts = features.read_descriptions(path, errors, progress=progress)
    texts = {ids.index[k]: t for k, t in by_raw.items() if k in ids.index}
    unknown = len(by_raw) - len(texts)
    if by_raw and not texts:
        raise DataError(f'{path}: none of its {len(by_raw)} item ids is a raw item id of this '
                        f'dataset (first ids in the file: {list(by_raw)[:3]}; in the dataset: '
                        f'{ids.raw[:3]}); expected the image descriptions of this dataset')
    return texts, {'description_duplicates_ignored': counts['duplicate_descriptions_ignored'],
                   'descriptions_for_unknown_items': unknown}


def item_documents(n_items: int, texts: Dict[int, str], image_texts: Dict[int, str],
                   image_words: int, fused_joins: bool) -> Tuple[List[str], Dict[str, int]]:
    """Each item's document (`word_view.item_document`) and what each held."""
    docs = []
    counts = {'items_text_and_image_words': 0, 'items_text_only': 0,
              'items_image_words_only': 0, 'items_without_text': 0}
    for i in range(n_items):
        text, image = texts.get(i), image_texts.get(i)
        has_t = bool(text and text.strip())
        has_i = bool(word_view.first_words(image, image_words))
        kind = ('items_text_and_image_words' if has_t and has_i else 'items_text_only' if has_t
                else 'items_image_words_only' if has_i else 'items_without_text')
        counts[kind] += 1
        docs.append(word_view.item_document(text, image, image_words, fused_joins))
    return docs, counts


# --------------------------------------------------------------------------- command line


def parse_bound(text: str, option: str):
    """A --min_df / --max_df value: digits = a document count (int), otherwise a fraction
    (float in [0, 1]), as scikit-learn tells them apart by type."""
    text = text.strip()
    try:
        value = int(text) if text.isdigit() else float(text)
        word_view.document_count_bound(value, 1, option)
    except ValueError as e:
        raise DataError(f'{option} {text!r}: {e}') from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m data_prep.words',
        description='DGVAE\'s word view of an MMRec-layout dataset: each user\'s TF-IDF over '
                    'the words of its training items (the reference\'s TfidfVectorizer('
                    'min_df=5, max_df=0.6) definitions), and the vocabulary.')
    parser.add_argument('--data_dir', required=True, help='folder holding <dataset>/')
    parser.add_argument('--dataset', required=True, help='dataset name (the .inter stem)')
    parser.add_argument('--item_text', default=None,
                        help=f'{ITEM_TEXT_FORMAT} (default <dataset>/{ITEM_TEXT}, written by '
                             f'data_prep.amazon / movielens)')
    parser.add_argument('--item_map', default=None,
                        help=f'raw item ids (default <dataset>/{features.ITEM_MAP} when present)')
    parser.add_argument('--descriptions', default=None,
                        help='JSON lines {"item_id" or "asin": raw id, "text": image '
                             'description} (data_prep.features\' description format)')
    parser.add_argument('--image_words', type=int, default=word_view.IMAGE_WORDS,
                        help=f'words of each description kept, from its start (default '
                             f'{word_view.IMAGE_WORDS}, as the reference; 0 = all)')
    parser.add_argument('--min_df', default=str(word_view.MIN_DF),
                        help='keep words in at least this many user documents (an integer) or '
                             'this fraction of them (a float in [0, 1]); default %(default)s')
    parser.add_argument('--max_df', default=str(word_view.MAX_DF),
                        help='keep words in at most this fraction of user documents (a float '
                             'in [0, 1]) or this many (an integer); default %(default)s')
    parser.add_argument('--fused_joins', action='store_true',
                        help='join texts without a separator, as the reference notebook does '
                             '(fuses the words at each join); default: join with a space')
    parser.add_argument('--words_output', default=word_view.WORDS_FILE,
                        help='default %(default)s')
    parser.add_argument('--vocab_output', default=word_view.VOCAB_FILE,
                        help='default %(default)s')
    parser.add_argument('--overwrite', action='store_true', help='replace existing outputs')
    parser.add_argument('--skip_malformed', action='store_true',
                        help='skip and count malformed lines of the JSON-lines inputs')
    parser.add_argument('--quiet', action='store_true', help='no progress lines on stderr')
    return parser


DEFINITIONS = {
    'documents': 'one per user (row u = user u): the documents of its training items (x_label '
                 '0), once per training row; valid and test rows never used',
    'item_document': 'item text, then the first image_words words of its image description',
    'tokens': 'lower-cased, then the matches of (?u)\\b\\w\\w+\\b (scikit-learn\'s default '
              'token pattern); no stop words, unigrams',
    'tf': 'raw count',
    'kept_words': 'min_df <= document frequency <= max_df (an int counts documents, a float is '
                  'a fraction of the number of users)',
    'idf': 'ln((1 + n_users) / (1 + df)) + 1 (smooth_idf)',
    'rows': 'tf * idf, L2-normalised; zero for a user without a kept word',
    'columns': 'the kept words in code-point order (the vocabulary file)',
}


def write_manifest(path: Path, args, argv: Sequence[str], inputs: Sequence[Path],
                   view: word_view.WordView, words_path: Path, vocab_path: Path,
                   counts: Dict[str, object], errors: LineErrors) -> None:
    """`<words_output stem>.manifest.json`: options, definitions, counts, sha256."""
    manifest = writer.base_manifest('words', {k: v for k, v in sorted(vars(args).items())},
                                    inputs, argv)
    manifest.update({
        'definitions': DEFINITIONS, 'counts': counts,
        'output': {words_path.name: {'sha256': writer.sha256_file(words_path),
                                     'shape': list(view.matrix.shape),
                                     'nonzeros': int(view.matrix.nnz), 'dtype': 'float32'},
                   vocab_path.name: {'sha256': writer.sha256_file(vocab_path),
                                     'words': len(view.vocabulary)}}})
    if errors.total():
        manifest['malformed_lines'] = errors.summary()
    path.write_text(json.dumps(manifest, indent=2) + '\n', encoding='utf-8')


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    min_df, max_df = parse_bound(args.min_df, '--min_df'), parse_bound(args.max_df, '--max_df')
    progress = not args.quiet
    dataset = read_dataset(args.data_dir, args.dataset)
    folder = dataset.folder
    words_path, vocab_path = folder / args.words_output, folder / args.vocab_output
    for path in (words_path, vocab_path):
        if path.exists() and not args.overwrite:
            raise DataError(f'{path} already exists; pass --overwrite to replace it')
    text_path = check_file(
        Path(args.item_text) if args.item_text else folder / ITEM_TEXT,
        f'the item texts the word view is built from: {ITEM_TEXT_FORMAT}. data_prep.amazon and '
        f'data_prep.movielens write {ITEM_TEXT} into the dataset folder; for other datasets '
        f'write one from the item metadata and pass --item_text FILE.jsonl')
    map_path = Path(args.item_map) if args.item_map else folder / features.ITEM_MAP
    ids = read_raw_ids(map_path, dataset.n_items, 'itemID', required=bool(args.item_map))
    errors = LineErrors(skip=args.skip_malformed)
    texts, counts = read_item_texts(text_path, ids, errors, progress)
    inputs = [text_path]
    image_texts: Dict[int, str] = {}
    if args.descriptions:
        desc_path = check_file(args.descriptions, 'a JSON-lines descriptions file')
        image_texts, more = read_image_texts(desc_path, ids, errors, progress)
        counts.update(more)
        inputs.append(desc_path)
    docs, more = item_documents(dataset.n_items, texts, image_texts, args.image_words,
                                args.fused_joins)
    counts.update(more)
    has_doc = np.array([bool(word_view.tokenize(d)) for d in docs], dtype=bool)
    counts['training_rows_of_items_without_words'] = int((~has_doc[dataset.train_items]).sum())
    if counts['items_without_text']:
        warn(f'{text_path}: {counts["items_without_text"]} of {dataset.n_items} items have no '
             f'text{" nor image words" if args.descriptions else ""} (they add no words to '
             f'their users\' documents; {counts["training_rows_of_items_without_words"]} '
             f'training rows)')
    try:
        view = word_view.build_word_view(docs, dataset.train_users, dataset.train_items,
                                         dataset.n_users, min_df=min_df, max_df=max_df,
                                         fused_joins=args.fused_joins)
    except ValueError as e:
        raise DataError(f'{text_path}: {e} (--min_df {args.min_df}, --max_df {args.max_df})'
                        ) from None
    counts.update({'users': dataset.n_users, 'items': dataset.n_items,
                   'training_rows': int(dataset.train_users.size), **view.stats})
    if view.stats['empty_documents']:
        warn(f'{words_path}: {view.stats["empty_documents"]} user(s) have no training row; '
             f'their rows are zero')
    word_view.save_word_view(view, words_path, vocab_path)
    write_manifest(words_path.with_name(f'{Path(args.words_output).stem}.manifest.json'), args,
                   argv, inputs, view, words_path, vocab_path, counts, errors)
    summary: Dict[str, object] = {
        'dataset': str(folder), 'words output': f'{words_path} {tuple(view.matrix.shape)} '
                                                f'({view.matrix.nnz} non-zeros)',
        'vocabulary': f'{vocab_path} ({len(view.vocabulary)} words)'}
    summary.update(counts)
    if errors.total():
        summary['malformed lines skipped'] = errors.total()
    print(writer.format_fixes(summary))
    print(f'train: python -m lirdrec_jax.main --config dgvae '
          f'--config.data.data_dir={args.data_dir} --config.data.dataset={args.dataset}'
          + (f' --config.data.words_file={args.words_output}'
             if args.words_output != word_view.WORDS_FILE else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main_guard(main))
