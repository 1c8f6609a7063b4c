"""MLLM features, the paper's variant: item images -> descriptions -> text embeddings.

LIRDRec's paper converts each item image into a text with a multimodal LLM and embeds that
text with a language model, then uses the embedding as the item's image modality. This stage
does the same for a dataset folder in MMRec layout (ours or MMRec's own downloads):

  descriptions  where the text of item i comes from (the captioner), one of
                --descriptions FILE.jsonl   (default) lines {"item_id" or "asin": raw id,
                                            "text": description}, produced elsewhere, e.g. by
                                            any multimodal LLM on your own hardware;
                --captioner_cmd "CMD {image}"  runs CMD once per image; stdout is the text;
                --captioner module:function    calls function(image_path) -> text;
                the last two need --image_dir (files named by raw item id, --image_pattern)
                and append what they produce to a JSON-lines file (default
                <dataset_dir>/<output stem>.descriptions.jsonl) that a rerun reuses, so an
                interrupted captioning run continues where it stopped;
  encoder       the same choice as the data commands (--encoder sbert/hashing,
                --encoder_model DIR for another sentence-transformers model);
  output        <dataset_dir>/image_text_feat.npy (n_items, d) float32, row i = item i;
                items without a description get the mean row (counted), plus
                image_text_feat.manifest.json (options, counts, sha256).

Raw item ids come from the folder's i_id_mapping.csv (raw id column, itemID column), which the
`amazon` / `movielens` commands write and MMRec's datasets ship.

Train with it as the image modality:
  python -m lirdrec_jax.main --config configs/lirdrec.py --config.data.data_dir=DATA \\
      --config.data.dataset=NAME --config.data.image_file=image_text_feat.npy
"""
import argparse
import glob
import importlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from data_prep import encoders, writer
from data_prep.pipeline import main_guard
from data_prep.progress import Progress
from data_prep.readers import LineErrors, check_file, iter_lines, parse_record
from lirdrec_jax import mmrec_files
from lirdrec_jax.data import DataError

ITEM_MAP = 'i_id_mapping.csv'
DEFAULT_OUTPUT = 'image_text_feat.npy'
ID_KEYS = ('item_id', 'asin')
MAX_REPORTED = 10

Captioner = Callable[[str], str]


# --------------------------------------------------------------------------- inputs


def read_item_map(path: Path, n_items: int) -> List[str]:
    """Raw item id of each itemID 0..n_items-1, from a tab-separated map with a header.

    The header names the columns: `itemID` and one other column holding the raw id (MMRec's
    maps call it `asin`; ours `asin` or `movieId`).

    Raises:
      DataError: missing columns, malformed lines, or itemIDs that are not exactly
        0..n_items-1.
    """
    lines = check_file(path, f'the item id map ({ITEM_MAP}: raw id<TAB>itemID per line)'
                       ).read_text(encoding='utf-8').splitlines()
    header = lines[0].split('\t') if lines else []
    if len(header) != 2 or 'itemID' not in header:
        raise DataError(f'{path}, line 1: header {header}; expected two tab-separated columns, '
                        f'one named itemID and one the raw item id (e.g. asin)')
    new_col = header.index('itemID')
    keys: Dict[int, str] = {}
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = line.split('\t')
        if len(fields) != 2 or not fields[new_col].strip().isdigit():
            raise DataError(f'{path}, line {number}: {line!r}; expected raw id<TAB>itemID '
                            f'with an integer itemID')
        item = int(fields[new_col])
        if item in keys:
            raise DataError(f'{path}, line {number}: itemID {item} appears a second time; '
                            f'expected each itemID once')
        keys[item] = fields[1 - new_col].strip()
    if sorted(keys) != list(range(n_items)):
        missing = sorted(set(range(n_items)) - set(keys))[:5]
        raise DataError(f'{path}: {len(keys)} itemIDs (range {min(keys, default=None)}..'
                        f'{max(keys, default=None)}), but the .inter file has n_items={n_items}; '
                        f'expected exactly the itemIDs 0..{n_items - 1} (first missing: '
                        f'{missing})')
    return [keys[i] for i in range(n_items)]


def read_descriptions(path: Path, errors: LineErrors, *, progress: bool = True
                      ) -> Tuple[Dict[str, str], Dict[str, int]]:
    """raw item id -> description, from JSON lines {"item_id" or "asin": id, "text": str}.

    Ids are compared as strings (MovieLens ids may be written as numbers). The first
    description of an item wins; later ones are counted.
    """
    texts: Dict[str, str] = {}
    duplicates = 0
    for number, line in iter_lines(path, errors, progress=progress):
        try:
            record = parse_record(line)
        except ValueError as e:
            errors.report(path, number, f'not a JSON object ({e})', line)
            continue
        key = next((record[k] for k in ID_KEYS if k in record), None)
        text = record.get('text')
        if key is None or isinstance(key, (dict, list)) or not isinstance(text, str):
            errors.report(path, number, 'expected {"item_id" (or "asin"): id, "text": '
                                        'string}', line)
            continue
        key = str(key)
        if key in texts:
            duplicates += 1
            continue
        texts[key] = text
    return texts, {'duplicate_descriptions_ignored': duplicates}


# --------------------------------------------------------------------------- captioners


class CommandCaptioner:
    """Runs a command per image; its standard output is the description.

    Args:
      template: the command line; `{image}` is replaced by the image path and `{item_id}` by
        the raw item id, inside each argument after shell-like splitting (no shell runs, so
        paths with spaces or quotes are passed intact).
      timeout: seconds per image.
    """

    def __init__(self, template: str, timeout: float = 600.0):
        self.argv = shlex.split(template)
        if not any('{image}' in a for a in self.argv):
            raise DataError(f'--captioner_cmd {template!r}: expected {{image}} where the image '
                            f'path goes, e.g. "my-captioner --image {{image}}"')
        self.timeout = timeout

    def __call__(self, image: str, item_id: str = '') -> str:
        argv = [a.replace('{image}', image).replace('{item_id}', item_id) for a in self.argv]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout)
        except FileNotFoundError as e:
            raise RuntimeError(f'command {argv[0]!r} not found ({e})') from None
        except subprocess.TimeoutExpired:
            raise RuntimeError(f'no answer within {self.timeout:g} s') from None
        if out.returncode != 0:
            raise RuntimeError(f'exit status {out.returncode}; stderr: '
                               f'{out.stderr.strip()[-300:]!r}')
        return out.stdout.strip()


def load_callable(spec: str) -> Captioner:
    """`package.module:function` -> the function (called as function(image_path) -> text)."""
    module_name, _, attr = spec.partition(':')
    if not module_name or not attr:
        raise DataError(f'--captioner {spec!r}: expected module:function, e.g. '
                        f'my_captions:describe')
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DataError(f'--captioner {spec!r}: cannot import {module_name!r} ({e}); expected '
                        f'a module on the Python path') from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DataError(f'--captioner {spec!r}: {module_name} has no callable {attr!r}')
    return fn


def find_image(image_dir: Path, pattern: str, key: str) -> Optional[Path]:
    """The image of one item: `pattern` with {item_id} replaced, globbed in `image_dir`.

    The default pattern '{item_id}.*' matches any extension; the first match in sorted order
    is used.
    """
    matches = sorted(glob.glob(str(image_dir / pattern.replace('{item_id}', glob.escape(key)))))
    return Path(matches[0]) if matches else None


def caption_items(keys: Sequence[str], captioner: Callable, image_dir: Path, pattern: str, *,
                  known: Dict[str, str], save_to: Path, on_error: str, pass_item_id: bool,
                  progress: bool = True) -> Tuple[Dict[str, str], Dict[str, object]]:
    """Describes every item not in `known`, appending each new description to `save_to`.

    Args:
      keys: raw item ids in itemID order.
      captioner: image path (and, when `pass_item_id`, the raw id) -> text.
      image_dir, pattern: where the images are (see `find_image`).
      known: descriptions already saved by an earlier run; reused, not recomputed.
      save_to: JSON-lines file the new descriptions are appended to (flushed per item).
      on_error: 'stop' = a failing image is a DataError; 'skip' = counted, no description.

    Returns:
      (raw id -> description for the items described, counts).
    """
    texts = {k: known[k] for k in keys if k in known}
    counts: Dict[str, object] = {'descriptions_reused': len(texts), 'descriptions_produced': 0,
                                 'items_without_image': 0, 'captioner_failures': 0}
    failures: List[str] = []
    todo = [k for k in keys if k not in texts]
    with open(save_to, 'a', encoding='utf-8') as out, \
            Progress('captioning images', len(todo), enabled=progress) as bar:
        for key in todo:
            bar.update(1)
            image = find_image(image_dir, pattern, key)
            if image is None:
                counts['items_without_image'] += 1
                continue
            try:
                text = captioner(str(image), key) if pass_item_id else captioner(str(image))
                if not isinstance(text, str) or not text.strip():
                    raise RuntimeError(f'returned {text!r}; expected a non-empty string')
            except Exception as e:  # the captioner is user code: any failure is reported
                message = f'item {key!r}, image {image}: {e}'
                if on_error == 'stop':
                    raise DataError(f'captioner failed on {message} (pass --on_caption_error '
                                    f'skip to count such items and give them the mean row)'
                                    ) from e
                counts['captioner_failures'] += 1
                if len(failures) < MAX_REPORTED:
                    failures.append(message)
                continue
            texts[key] = text.strip()
            counts['descriptions_produced'] += 1
            out.write(json.dumps({'item_id': key, 'text': texts[key]}, ensure_ascii=False) + '\n')
            out.flush()
    if failures:
        counts['captioner_failures_first'] = failures
    return texts, counts


# --------------------------------------------------------------------------- features


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """np.save via a temp file in the same folder and os.replace (never a truncated .npy)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.stem}-', suffix='.npy.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_features(keys: Sequence[str], descriptions: Dict[str, str],
                   encoder: encoders.Encoder, out_path: Path
                   ) -> Tuple[np.ndarray, Dict[str, int]]:
    """Encodes the description of each item (itemID order); mean row for the others.

    Returns:
      ((n_items, d) float32, validated as training validates features, counts).
    """
    texts = [descriptions.get(k) for k in keys]
    try:
        feat, n_filled = encoders.encode_item_texts(encoder, texts)
    except ValueError as e:
        raise DataError(f'{out_path}: {e}; expected descriptions keyed by the raw item ids of '
                        f'{ITEM_MAP} (first ids: {list(keys[:3])})') from None
    feat = mmrec_files.validate_features(feat, out_path, len(keys))
    counts = {'items': len(keys), 'items_described': len(keys) - n_filled,
              'items_without_description_mean_filled': n_filled,
              'descriptions_for_unknown_items': len(set(descriptions) - set(keys))}
    return feat, counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m data_prep.features',
        description='MLLM features: item images -> descriptions (a captioner) -> embeddings '
                    '(a text encoder) -> <dataset_dir>/image_text_feat.npy, usable as the '
                    'image modality (--config.data.image_file=image_text_feat.npy).')
    parser.add_argument('--dataset_dir', required=True,
                        help='the dataset folder <data_dir>/<name> (holds <name>.inter and '
                             f'{ITEM_MAP})')
    parser.add_argument('--name', default=None,
                        help='dataset name (the .inter stem); default the folder name')
    parser.add_argument('--item_map', default=None, help=f'default <dataset_dir>/{ITEM_MAP}')
    g = parser.add_argument_group('captioner (one of)')
    g.add_argument('--descriptions', default=None,
                   help='JSON lines {"item_id" or "asin": raw id, "text": description} '
                        '(the default captioner: descriptions produced elsewhere)')
    g.add_argument('--captioner_cmd', default=None,
                   help='command run per image, e.g. "my-mllm --image {image}"; stdout = text')
    g.add_argument('--captioner', default=None,
                   help='Python callable module:function(image_path) -> text')
    g.add_argument('--image_dir', default=None,
                   help='folder of item images (for --captioner_cmd / --captioner)')
    g.add_argument('--image_pattern', default='{item_id}.*',
                   help='image file name of an item inside --image_dir (default {item_id}.*)')
    g.add_argument('--save_descriptions', default=None,
                   help='JSON-lines file the produced descriptions are appended to and reused '
                        'from (default <dataset_dir>/<output stem>.descriptions.jsonl)')
    g.add_argument('--on_caption_error', choices=('stop', 'skip'), default='stop',
                   help='stop at a failing image (default) or count it and use the mean row')
    g.add_argument('--caption_timeout', type=float, default=600.0,
                   help='seconds per image for --captioner_cmd')
    parser.add_argument('--output', default=DEFAULT_OUTPUT,
                        help=f'feature file written inside the dataset folder ({DEFAULT_OUTPUT})')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output')
    parser.add_argument('--skip_malformed', action='store_true',
                        help='skip and count malformed lines of --descriptions')
    parser.add_argument('--quiet', action='store_true', help='no progress lines on stderr')
    encoders.add_encoder_args(parser)
    return parser


def _captioner_source(args) -> str:
    given = [n for n in ('descriptions', 'captioner_cmd', 'captioner') if getattr(args, n)]
    if len(given) != 1:
        raise DataError(f'give exactly one of --descriptions, --captioner_cmd, --captioner '
                        f'(got {["--" + n for n in given] or "none"})')
    if given[0] != 'descriptions' and not args.image_dir:
        raise DataError(f'--{given[0]} needs --image_dir, the folder of item images')
    return given[0]


def collect_descriptions(args: argparse.Namespace, source: str, captioner: Optional[Callable],
                         keys: Sequence[str], dataset_dir: Path, errors: LineErrors
                         ) -> Tuple[Dict[str, str], Dict[str, object]]:
    """The descriptions from the chosen captioner: read, or produced (and saved) per image."""
    progress = not args.quiet
    if source == 'descriptions':
        return read_descriptions(check_file(args.descriptions, 'a JSON-lines descriptions file'),
                                 errors, progress=progress)
    image_dir = Path(args.image_dir)
    if not image_dir.is_dir():
        raise DataError(f'--image_dir {image_dir} does not exist (or is not a folder)')
    save_to = (Path(args.save_descriptions) if args.save_descriptions
               else dataset_dir / f'{Path(args.output).stem}.descriptions.jsonl')
    known = read_descriptions(save_to, errors, progress=False)[0] if save_to.is_file() else {}
    return caption_items(keys, captioner, image_dir, args.image_pattern, known=known,
                         save_to=save_to, on_error=args.on_caption_error,
                         pass_item_id=source == 'captioner_cmd', progress=progress)


def write_manifest(out_path: Path, args: argparse.Namespace, argv: Sequence[str],
                   encoder: encoders.Encoder, counts: Dict[str, object], shape: Tuple[int, int],
                   errors: LineErrors) -> Path:
    """`<output stem>.manifest.json` beside the feature file: options, counts, sha256."""
    manifest = writer.base_manifest('features', {k: v for k, v in sorted(vars(args).items())},
                                    [p for p in (args.descriptions,) if p], argv)
    manifest.update({'encoder': encoder.describe(), 'counts': counts,
                     'output': {out_path.name: {'sha256': writer.sha256_file(out_path),
                                                'shape': list(shape)}}})
    if errors.total():
        manifest['malformed_lines'] = errors.summary()
    path = out_path.with_name(f'{out_path.stem}.manifest.json')
    path.write_text(json.dumps(manifest, indent=2) + '\n', encoding='utf-8')
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    # Everything that can fail fast does, before any captioning or encoding.
    source = _captioner_source(args)
    captioner = None
    if source == 'captioner_cmd':
        captioner = CommandCaptioner(args.captioner_cmd, args.caption_timeout)
    elif source == 'captioner':
        captioner = load_callable(args.captioner)
    dataset_dir = Path(args.dataset_dir)
    name = args.name or dataset_dir.name
    inter = mmrec_files.check_layout(dataset_dir, name)
    n_items = mmrec_files.split_interactions(mmrec_files.read_inter(inter), inter).n_items
    keys = read_item_map(Path(args.item_map) if args.item_map else dataset_dir / ITEM_MAP,
                         n_items)
    out_path = dataset_dir / args.output
    if out_path.exists() and not args.overwrite:
        raise DataError(f'{out_path} already exists; pass --overwrite to replace it')
    encoder = encoders.encoder_from_args(args, progress=not args.quiet)

    errors = LineErrors(skip=args.skip_malformed)
    descriptions, counts = collect_descriptions(args, source, captioner, keys, dataset_dir,
                                                errors)
    if errors.total():
        counts['malformed_lines_skipped'] = errors.total()
    feat, feat_counts = build_features(keys, descriptions, encoder, out_path)
    counts.update(feat_counts)
    save_npy_atomic(out_path, feat)
    write_manifest(out_path, args, argv, encoder, counts, feat.shape, errors)

    print(writer.format_fixes({'dataset': str(dataset_dir), **{
        k: v for k, v in counts.items() if not isinstance(v, list)},
        'output': f'{out_path} {tuple(feat.shape)}'}))
    print(f'train with it as the image modality: python -m lirdrec_jax.main --config '
          f'configs/lirdrec.py --config.data.data_dir={dataset_dir.parent} '
          f'--config.data.dataset={name} --config.data.image_file={out_path.name}')
    return 0


if __name__ == '__main__':
    sys.exit(main_guard(main))
