"""Superseded by `python -m lirdrec_jax.bench` (see docs/performance.md); kept so that the old
command still works:

  python bench/epoch_time.py [--epochs 2]   ==   python -m lirdrec_jax.bench --scale baby
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lirdrec_jax import bench  # noqa: E402

if __name__ == '__main__':
    bench.main(['--scale', 'baby', *sys.argv[1:]])
