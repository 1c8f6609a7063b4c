"""Writing a prepared dataset in MMRec layout, with id maps and a manifest.

`<out_dir>/<name>/` receives
  <name>.inter          tab-separated: userID, itemID, rating, timestamp, x_label
  text_feat.npy         (n_items, d_t) float32, row i = item i
  image_feat.npy        (n_items, d_v) float32, when image features were given
  u_id_mapping.csv      tab-separated raw user id -> userID (MMRec's file name and layout)
  i_id_mapping.csv      tab-separated raw item id -> itemID
  item_text.jsonl       the text each item's text_feat row was encoded from, one JSON line
                        {"item_id": raw id, "text": ...} per item with a non-blank text, in
                        itemID order (the item text of `python -m data_prep.mllmrec`)
  manifest.json         counts, sparsity, sha256 of every other file, the options used, and
                        the count of every fix applied (dropped duplicates, mean-filled rows...)

Everything is written to a temporary sibling folder, read back through `lirdrec_jax.mmrec_files`
(the same parsing and validation training uses), and only then renamed into place, so a failed or
interrupted run never leaves a half-written dataset where training would find it.
"""
import hashlib
import json
import os
import platform
import shutil
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from data_prep.interactions import SplitInteractions
from lirdrec_jax import mmrec_files
# format_inter and INTER_HEADER define the .inter text; they live with the layout's reader.
from lirdrec_jax.mmrec_files import INTER_HEADER, DataError, format_inter  # noqa: F401

PathLike = Union[str, os.PathLike]

MANIFEST = 'manifest.json'
ITEM_TEXT = 'item_text.jsonl'
MANIFEST_FORMAT = 1
GENERATOR = 'lirdrec_jax data_prep'


def format_id_map(raw_column: str, new_column: str, keys: Sequence) -> str:
    """`raw_column<TAB>new_column` header, then `raw id<TAB>new id` for new ids 0.. in order."""
    body = ''.join(f'{k}\t{i}\n' for i, k in enumerate(keys))
    return f'{raw_column}\t{new_column}\n{body}'


def format_item_texts(keys: Sequence, texts: Dict) -> str:
    """JSON lines {"item_id": raw id (as a string), "text": ...} in itemID order, for the items
    whose text is present and not blank."""
    return ''.join(json.dumps({'item_id': str(k), 'text': texts[k]}, ensure_ascii=False) + '\n'
                   for k in keys if isinstance(texts.get(k), str) and texts[k].strip())


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def _write_text(path: Path, text: str) -> None:
    # newline='\n': the same bytes on every platform.
    with open(path, 'w', encoding='utf-8', newline='\n') as f:
        f.write(text)


def check_destination(out_dir: PathLike, name: str, overwrite: bool) -> Path:
    """Raises DataError when `<out_dir>/<name>` exists and may not be replaced.

    Only a folder holding our own manifest.json is replaced (with `overwrite`), so that a typo
    in --out_dir never deletes someone's files.
    """
    folder = Path(out_dir) / name
    if folder.exists():
        ours = (folder / MANIFEST).is_file()
        if not overwrite or not ours:
            why = ('pass --overwrite to replace it' if ours else
                   'it was not written by these commands (no manifest.json), so it is never '
                   'replaced; choose another --out_dir or --name')
            raise DataError(f'{folder} already exists; {why}')
    return folder


def write_dataset(out_dir: PathLike, name: str, data: SplitInteractions, *,
                  text_feat: Optional[np.ndarray], image_feat: Optional[np.ndarray],
                  raw_item_column: str, raw_user_column: str, manifest: Dict[str, object],
                  overwrite: bool = False, item_texts: Optional[Dict] = None
                  ) -> Tuple[Dict[str, object], Dict[str, object]]:
    """Writes the dataset folder and its manifest.

    Args:
      out_dir: the data folder (what training calls data_dir).
      name: dataset name; files go to `<out_dir>/<name>/`.
      data: the split interactions.
      text_feat, image_feat: (n_items, d) float32 or None (not written).
      raw_item_column, raw_user_column: header of the raw-id column in the id maps
        ('asin' / 'user_id' for Amazon, as MMRec's maps; 'movieId' / 'userId' for MovieLens).
      manifest: command, options, input files and fix counts; this function adds the output
        counts, sparsity and hashes.
      overwrite: replace an existing folder written by these commands.
      item_texts: raw item id -> the item's text (what text_feat was encoded from), written
        as `item_text.jsonl`; None = not written.

    Returns:
      (the manifest written, the read-back statistics of `lirdrec_jax.mmrec_files.summary_stats`).
    """
    folder = check_destination(out_dir, name, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f'.{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
    tmp.mkdir()
    try:
        _write_text(tmp / f'{name}.inter', format_inter(data.users, data.items, data.ratings,
                                                        data.timestamps, data.x_label))
        _write_text(tmp / 'u_id_mapping.csv', format_id_map(raw_user_column, 'userID',
                                                            data.user_keys))
        _write_text(tmp / 'i_id_mapping.csv', format_id_map(raw_item_column, 'itemID',
                                                            data.item_keys))
        if item_texts is not None:
            _write_text(tmp / ITEM_TEXT, format_item_texts(data.item_keys, item_texts))
        feature_files = {}
        for fname, feat in (('image_feat.npy', image_feat), ('text_feat.npy', text_feat)):
            if feat is not None:
                np.save(tmp / fname, mmrec_files.validate_features(feat, folder / fname,
                                                                   len(data.item_keys)))
                feature_files[fname] = list(feat.shape)
        # Read everything back as training will; any inconsistency fails here, not later.
        _, stats = mmrec_files.prepare_arrays(
            tmp, name, image_file='image_feat.npy' if image_feat is not None else '',
            text_file='text_feat.npy' if text_feat is not None else '')
        full = dict(manifest)
        full.update(build_counts(data, stats, feature_files))
        full['outputs'] = {p.name: {'sha256': sha256_file(p), 'bytes': p.stat().st_size}
                           for p in sorted(tmp.iterdir())}
        _write_text(tmp / MANIFEST, json.dumps(full, indent=2, sort_keys=False) + '\n')
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return full, stats


def build_counts(data: SplitInteractions, stats: Dict[str, object],
                 feature_files: Dict[str, List[int]]) -> Dict[str, object]:
    """The manifest's `counts` section, from the read-back statistics."""
    per_user = np.bincount(data.users)
    per_item = np.bincount(data.items)
    return {'counts': {
        'n_users': stats['n_users'], 'n_items': stats['n_items'],
        'n_interactions': stats['n_interactions'], 'n_train': stats['n_train'],
        'n_valid': stats['n_valid'], 'n_test': stats['n_test'],
        'sparsity': stats['sparsity'],
        'interactions_per_user': {'min': int(per_user.min()), 'mean': float(per_user.mean()),
                                  'max': int(per_user.max())},
        'interactions_per_item': {'min': int(per_item.min()), 'mean': float(per_item.mean()),
                                  'max': int(per_item.max())},
        'features': feature_files,
    }}


def base_manifest(command: str, options: Dict[str, object], inputs: Sequence[PathLike],
                  argv: Sequence[str]) -> Dict[str, object]:
    """The manifest's header: generator, command line, options and the input files read.

    Inputs are recorded by path and size (not hashed: Amazon dumps run to tens of GB).
    """
    return {
        'format': MANIFEST_FORMAT,
        'generator': GENERATOR,
        'command': command,
        'argv': list(argv),
        'options': options,
        'inputs': {str(p): {'bytes': os.path.getsize(p)} for p in inputs},
        'python': platform.python_version(),
        'numpy': np.__version__,
    }


def format_fixes(fixes: Dict[str, object]) -> str:
    """The fixes section of the summary table: one `name  value` line each."""
    rows = [(k.replace('_', ' '), v) for k, v in fixes.items()]
    if not rows:
        return ''
    width = max(len(k) for k, _ in rows)
    return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)
