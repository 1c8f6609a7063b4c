"""Command-line front end: convert an MMRec-layout dataset folder into a validated, cached
`.npz` and print its statistics.

The layout, its parsing and validation, and the cache live in `lirdrec_jax.mmrec_files` (the
same code `lirdrec_jax.data.load_mmrec` runs before training); this module only adds the
command and its summary table.

Usage:
  python -m data_prep.mmrec --data_dir /data/mmrec --dataset baby
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from lirdrec_jax.mmrec_files import (DataError, cache_is_fresh, convert_mmrec,
                                     default_cache_path, summary_stats)


def format_summary(name: str, stats: Dict[str, object]) -> str:
    """A small fixed-width table of `summary_stats`."""
    rows = [('dataset', name),
            ('users', stats['n_users']),
            ('items', stats['n_items']),
            ('train interactions', stats['n_train']),
            ('valid interactions', stats['n_valid']),
            ('test interactions', stats['n_test']),
            ('dropped cold-start valid rows', stats['dropped_valid']),
            ('dropped cold-start test rows', stats['dropped_test']),
            ('image_feat', stats['image_feat_shape'] or 'absent'),
            ('text_feat', stats['text_feat_shape'] or 'absent'),
            ('sparsity', f"{stats['sparsity']:.4%}")]
    width = max(len(k) for k, _ in rows)
    return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m data_prep.mmrec',
        description='Convert an MMRec-layout dataset (<data_dir>/<dataset>/<dataset>.inter, '
                    'image_feat.npy, text_feat.npy) into a validated .npz cache and print a '
                    'summary.')
    parser.add_argument('--data_dir', required=True,
                        help='folder holding the <dataset>/ folder')
    parser.add_argument('--dataset', required=True, help='dataset name, e.g. baby')
    parser.add_argument('--image_file', default='image_feat.npy',
                        help="image feature file inside the dataset folder ('' = none)")
    parser.add_argument('--text_file', default='text_feat.npy',
                        help="text feature file inside the dataset folder ('' = none)")
    parser.add_argument('--cache_dir', default='',
                        help='where to write <dataset>.npz (default '
                             '<data_dir>/<dataset>/.lirdrec_jax_cache)')
    parser.add_argument('--force', action='store_true',
                        help='rebuild even when the cache is fresh')
    args = parser.parse_args(argv)

    dataset_dir = Path(args.data_dir) / args.dataset
    cache = (Path(args.cache_dir) / f'{args.dataset}.npz' if args.cache_dir
             else default_cache_path(dataset_dir, args.dataset))
    kw = dict(image_file=args.image_file, text_file=args.text_file)
    try:
        if args.force or not cache_is_fresh(dataset_dir, args.dataset, cache, **kw):
            convert_mmrec(dataset_dir, args.dataset, cache_path=cache, **kw)
            status = 'written'
        else:
            status = 'fresh, reused'
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    with np.load(cache, allow_pickle=False) as z:
        stats = summary_stats({k: z[k] for k in z.files})
    print(format_summary(args.dataset, stats))
    print(f'cache ({status}): {cache}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
