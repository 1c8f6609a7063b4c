"""Command-line front end: write a synthetic dataset in MMRec layout.

The generator (and the embedded default dataset that training generates on first use) lives in
`lirdrec_jax.synthetic`; this module only adds the command. With the default options it writes
the embedded default dataset, byte for byte.

Usage:
  python -m data_prep.synthetic --out_dir /tmp/data            # writes /tmp/data/synthetic/
  python -m lirdrec_jax.main ... --config.data.data_dir=/tmp/data --config.data.dataset=synthetic
"""
import argparse
import sys
from typing import Optional, Sequence

from lirdrec_jax.synthetic import (DEFAULT_NAME, generate_synthetic, summarize,
                                   write_mmrec_files)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m data_prep.synthetic',
        description='Write the synthetic dataset in MMRec layout (<out_dir>/<name>/<name>.inter, '
                    'image_feat.npy, text_feat.npy), with the model inputs built from it '
                    '(MLLMRec\'s no-LLM stand-ins; item_text.jsonl and DGVAE\'s word view, '
                    'user_words_tfidf.npz and user_words_vocab.txt). The defaults give the '
                    'embedded default.')
    parser.add_argument('--out_dir', required=True, help='data folder to write <name>/ into')
    parser.add_argument('--name', default=DEFAULT_NAME, help='dataset name')
    parser.add_argument('--n_users', type=int, default=1500, help='users before filtering')
    parser.add_argument('--n_items', type=int, default=800, help='items before filtering')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--image_dim', type=int, default=512)
    parser.add_argument('--text_dim', type=int, default=384)
    args = parser.parse_args(argv)
    data = generate_synthetic(n_users=args.n_users, n_items=args.n_items, seed=args.seed,
                              image_dim=args.image_dim, text_dim=args.text_dim)
    folder = write_mmrec_files(args.out_dir, args.name, data)
    print(f'wrote {folder}')
    print(summarize(data))
    return 0


if __name__ == '__main__':
    sys.exit(main())
