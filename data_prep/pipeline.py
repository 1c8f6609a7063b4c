"""The part of every raw-data command after parsing: filters, split, features, writing, summary.

A command (`amazon`, `movielens`) parses its raw files into
  * `RawInteractions` (rows with raw ids),
  * item texts: raw item id -> text, for the items that have metadata,
  * optionally an image-feature reader for the final item order,
and hands them to `run`, which applies the shared options below in this order:
  1. --min_rating: rows rated below it are dropped (implicit positives);
  2. items without metadata: dropped before filtering (--items_without_meta drop, default) or
     kept with the mean text row (mean); counted either way;
  3. duplicates, iterated k-core, re-indexing and the per-user split (`interactions`);
  4. text features (one encoder call over the items that have text; the others get the mean
     row), image features (absent rows get the mean row);
  5. the MMRec-layout folder (with `item_text.jsonl`, the item texts, for
     `python -m data_prep.mllmrec`) and its manifest (`writer`), read back through
     `lirdrec_jax.mmrec_files`;
  6. a summary table on stdout.
"""
import argparse
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from data_prep import encoders, interactions, mmrec, writer
from data_prep.interactions import RawInteractions
from data_prep.readers import LineErrors
from lirdrec_jax.data import DataError

# Reads image features for the given raw item ids (final item order) and returns
# ((n_items, d) rows, (n_items,) bool present, counts for the manifest).
ImageReader = Callable[[List], Tuple[np.ndarray, np.ndarray, Dict[str, int]]]


class CommandStart(NamedTuple):
    """What every raw-data command has before it reads its files (`start`)."""
    argv: List[str]
    args: argparse.Namespace
    progress: bool
    encoder: encoders.Encoder
    errors: LineErrors


def start(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> CommandStart:
    """Parses the command line and fails fast, before the (long) parse of the raw files: the
    text encoder is loaded (a missing model is an error now) and the shared options checked."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    progress = not args.quiet
    encoder = encoders.encoder_from_args(args, progress=progress)
    check_args(args)
    return CommandStart(argv, args, progress, encoder, LineErrors(skip=args.skip_malformed))


def add_pipeline_args(parser: argparse.ArgumentParser, *, min_rating: Optional[float]) -> None:
    """The options shared by the raw-data commands (output, filtering, split, encoder)."""
    g = parser.add_argument_group('output')
    g.add_argument('--out_dir', required=True,
                   help='data folder: the dataset is written to <out_dir>/<name>/ (train with '
                        '--config.data.data_dir=<out_dir> --config.data.dataset=<name>)')
    g.add_argument('--name', required=True, help='dataset name, e.g. baby')
    g.add_argument('--overwrite', action='store_true',
                   help='replace <out_dir>/<name>/ if an earlier run of these commands wrote it')
    g = parser.add_argument_group('filtering and split')
    g.add_argument('--k', type=int, default=5,
                   help='k-core: users and items keep >= k interactions, filtered repeatedly '
                        'until stable (default 5; users always need >= 3)')
    g.add_argument('--split', default='0.8,0.1,0.1',
                   help='per-user chronological train,valid,test fractions (default 0.8,0.1,'
                        '0.1); each user gets max(1, round_half_up(n*fraction)) valid and test '
                        'rows, the rest train')
    g.add_argument('--min_rating', type=float, default=min_rating,
                   help='keep only interactions rated >= this (implicit positives); '
                        f'default {min_rating}' + (' (keep all)' if min_rating is None else ''))
    g.add_argument('--items_without_meta', choices=('drop', 'mean'), default='drop',
                   help='items that have interactions but no metadata: drop them before '
                        'filtering (default), or keep them with the mean text-feature row')
    g.add_argument('--skip_malformed', action='store_true',
                   help='skip and count malformed input lines instead of stopping at the first')
    g.add_argument('--quiet', action='store_true', help='no progress lines on stderr')
    encoders.add_encoder_args(parser)


def options_of(args: argparse.Namespace) -> Dict[str, object]:
    """Every option of the run, as the manifest records it."""
    return {k: v for k, v in sorted(vars(args).items())}


def filter_min_rating(raw: RawInteractions, min_rating: Optional[float]
                      ) -> Tuple[RawInteractions, int]:
    """Rows rated >= min_rating; returns them and the number dropped."""
    if min_rating is None:
        return raw, 0
    keep = raw.ratings >= min_rating
    return interactions.select(raw, keep), int((~keep).sum())


def filter_items_with_text(raw: RawInteractions, has_meta: np.ndarray
                           ) -> Tuple[RawInteractions, Dict[str, int]]:
    """Drops the rows of items without metadata.

    Args:
      raw: the interactions.
      has_meta: (len(raw.item_keys),) bool, per item code.
    """
    keep = has_meta[raw.items]
    dropped_items = np.unique(raw.items[~keep]).size
    return interactions.select(raw, keep), {'items_without_metadata_dropped': int(dropped_items),
                                            'rows_of_items_without_metadata': int((~keep).sum())}


def check_args(args: argparse.Namespace) -> Tuple[float, float]:
    """Checks the shared options before any input is read (a long parse must not end in a
    usage error). Returns (valid_ratio, test_ratio)."""
    try:
        _, valid_ratio, test_ratio = interactions.parse_split(args.split)
    except ValueError as e:
        raise DataError(f'--split: {e}') from None
    if args.k < 1:
        raise DataError(f'--k {args.k}: expected k >= 1 (1 keeps every user and item)')
    writer.check_destination(args.out_dir, args.name, args.overwrite)
    return valid_ratio, test_ratio


def filter_and_split(raw: RawInteractions, args: argparse.Namespace, item_texts: Dict
                     ) -> Tuple[interactions.SplitInteractions, Dict[str, object]]:
    """Rules 2-7 of docs/data_prep.md: threshold, metadata, duplicates, k-core, ids, split."""
    valid_ratio, test_ratio = check_args(args)
    fixes: Dict[str, object] = {}
    raw, below = filter_min_rating(raw, args.min_rating)
    if args.min_rating is not None:
        fixes['rows_below_min_rating'] = below
    if args.items_without_meta == 'drop':
        has_meta = np.array([k in item_texts for k in raw.item_keys], dtype=bool)
        raw, dropped = filter_items_with_text(raw, has_meta)
        fixes.update(dropped)
    split, counts = interactions.prepare_interactions(raw, k=args.k, valid_ratio=valid_ratio,
                                                      test_ratio=test_ratio)
    fixes.update(counts)
    return split, fixes


def item_features(item_keys: List, item_texts: Dict, encoder: encoders.Encoder,
                  image_reader: Optional[ImageReader]
                  ) -> Tuple[np.ndarray, Optional[np.ndarray], Dict[str, object]]:
    """(text_feat, image_feat or None, counts) for the final items, mean rows where absent."""
    fixes: Dict[str, object] = {
        'items_without_metadata_kept_mean_text': sum(k not in item_texts for k in item_keys),
        'items_with_empty_text_mean_text': sum(k in item_texts and not item_texts[k].strip()
                                               for k in item_keys)}
    try:
        text_feat, _ = encoders.encode_item_texts(encoder, [item_texts.get(k) for k in item_keys])
    except ValueError as e:
        raise DataError(f'text features: {e}; expected metadata with a title, brand, '
                        f'categories or description for the items') from None
    if image_reader is None:
        return text_feat, None, fixes
    rows, present, image_counts = image_reader(item_keys)
    fixes.update(image_counts)
    fixes['image_rows_mean_filled'] = int((~present).sum())
    try:
        image_feat = encoders.mean_fill(rows, present)
    except ValueError:
        raise DataError(f'image features: none of the {len(item_keys)} items has a usable row '
                        f'(first items: {item_keys[:5]}); expected the image-feature file of '
                        f'the same dataset') from None
    return text_feat, image_feat, fixes


def run(command: str, args: argparse.Namespace, raw: RawInteractions, *,
        item_texts: Dict, image_reader: Optional[ImageReader], read_fixes: Dict[str, object],
        errors: LineErrors, inputs: Sequence, raw_user_column: str, raw_item_column: str,
        argv: Sequence[str], encoder: encoders.Encoder) -> Dict[str, object]:
    """Filters, splits, encodes and writes; prints the summary. Returns the manifest.

    Args:
      command: 'amazon' / 'movielens', recorded in the manifest.
      args: the parsed command line (see `add_pipeline_args`).
      raw: interactions as parsed.
      item_texts: raw item id -> text, for items with metadata (a text may be '').
      image_reader: image features for the final items, or None (no image_feat.npy).
      read_fixes: counts from parsing (records skipped, ...), reported first.
      errors: the malformed-line tally of the parse.
      inputs: input files, for the manifest.
      raw_user_column, raw_item_column: id-map headers.
      argv: the command line, recorded in the manifest.
      encoder: the text encoder.
    """
    if raw.users.size == 0:
        raise DataError(f'no interactions were read from {[str(p) for p in inputs]}; expected '
                        f'at least one rating row')
    fixes: Dict[str, object] = {'rows_read': int(raw.users.size), **read_fixes}
    if errors.total():
        fixes['malformed_lines_skipped'] = errors.total()
    split, split_fixes = filter_and_split(raw, args, item_texts)
    fixes.update(split_fixes)
    text_feat, image_feat, feature_fixes = item_features(split.item_keys, item_texts, encoder,
                                                         image_reader)
    fixes.update(feature_fixes)

    manifest = writer.base_manifest(command, options_of(args), inputs, argv)
    manifest.update({'encoder': encoder.describe(), 'fixes': fixes})
    if errors.total():
        manifest['malformed_lines'] = errors.summary()
    manifest, stats = writer.write_dataset(
        args.out_dir, args.name, split, text_feat=text_feat, image_feat=image_feat,
        raw_item_column=raw_item_column, raw_user_column=raw_user_column, manifest=manifest,
        overwrite=args.overwrite, item_texts=item_texts)
    print_summary(args, stats, fixes, image_feat is not None)
    return manifest


def print_summary(args: argparse.Namespace, stats: Dict[str, object], fixes: Dict[str, object],
                  has_image: bool) -> None:
    """The summary table: dataset statistics (as `python -m data_prep.mmrec` prints them),
    then every fix applied, then how to train on the result."""
    print(mmrec.format_summary(args.name, stats))
    print()
    print('fixes and filters applied')
    print(writer.format_fixes(fixes))
    print()
    folder = f'{args.out_dir}/{args.name}'
    print(f'wrote {folder}/ (manifest.json lists every option, count and file hash)')
    if not has_image:
        print('note: no image_feat.npy; LIRDRec needs two modalities. Make one with '
              '`python -m data_prep.features` (item images -> descriptions -> embeddings) and '
              'pass --config.data.image_file=image_text_feat.npy, or train text-only with '
              '--config.data.image_file=text_feat.npy (see docs/data_prep.md)')
    print(f'train: python -m lirdrec_jax.main --config lirdrec '
          f'--config.data.data_dir={args.out_dir} --config.data.dataset={args.name}')


def main_guard(main_fn: Callable[[Optional[Sequence[str]]], int],
               argv: Optional[Sequence[str]] = None) -> int:
    """Runs a command's main; a DataError or EncoderError becomes 'error: ...' and exit 1."""
    try:
        return main_fn(argv)
    except (DataError, encoders.EncoderError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
