"""Benchmark one LIRDRec grid point at the scale of MMRec's Amazon datasets, on synthetic data.

  python -m lirdrec_jax.bench --scale baby [--epochs 2] [--json out.json]
  python -m lirdrec_jax.bench --scale baby --fast        # the CPU speed options
  python -m lirdrec_jax.bench --scale clothing --fast --matmul_dtype bfloat16
  python -m lirdrec_jax.bench --scale baby --sweep_points 4      # also: vmapped vs sequential
  python -m lirdrec_jax.bench --scale baby --reference /path/to/LIRDRec   # also the reference

Generates a synthetic dataset with exactly the counts of the chosen scale (Baby 19,445 users /
7,050 items / 160,792 interactions; Sports 35,598 / 18,357 / 296,337; Clothing 39,387 /
23,033 / 278,677), 4096-d image and 384-d text features, skewed item popularity and 5+
interactions per user, split per user like MMRec's chronological 8:1:1 (about 74/13/13). The data carry no signal: this measures
speed, not accuracy. It then trains the reference's default point (batch 2048, 64-d, two
user-item layers) on every visible device and prints: compile time, training epoch time,
evaluation time (valid + test), peak host RSS and device memory (where the backend reports
it), parameter count, the dense-matmul floor measured on this machine (GEMM rate x the towers'
FLOP count) and the epoch time as a multiple of it; a table; and the same as JSON (--json).

On a GPU or TPU the same command measures the same quantities on all local devices (the item
features and the towers' work split over them, users split for evaluation), reports each
device's peak memory from `memory_stats()`, and computes the floor from the GEMM rate it
measures on one device times the device count.
"""
import argparse
import json
import os
import platform
import resource
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lirdrec_jax import grid, optim, parallel, sampling, sweep, train
from lirdrec_jax.data import Interactions, MMRecDataset
from lirdrec_jax.models import lirdrec

# (users, items, interactions) of MMRec's preprocessed Amazon datasets.
SCALES = {'baby': (19445, 7050, 160792), 'sports': (35598, 18357, 296337),
          'clothing': (39387, 23033, 278677),
          'small': (1499, 700, 25976),  # the size of the embedded default dataset
          'tiny': (600, 300, 4000)}  # for tests of this command
IMAGE_DIM, TEXT_DIM = 4096, 384
EVAL_REPEATS = 3  # evaluations timed after the first (which compiles); the best is reported


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def synthetic_dataset(n_users: int, n_items: int, n_interactions: int, *, seed: int = 0,
                      image_dim: int = IMAGE_DIM, text_dim: int = TEXT_DIM,
                      name: str = 'bench') -> MMRecDataset:
    """Random interactions with the given counts and Amazon-like shape, random features.

    Every user gets at least 5 distinct items; the rest of the interactions go to users with
    a long-tailed activity; items are drawn with popularity proportional to 1/(rank + 10).
    Each user's last rows are test and valid rows (max(1, round(n/10)) each), the rest training
    rows, as MMRec's chronological 8:1:1 split gives it for short histories. Features: non-negative 4096-d "CNN" vectors and unit 384-d
    "sentence" vectors, each a noisy projection of 16 latent factors (so kNN graphs are not
    degenerate).
    """
    rng = np.random.default_rng(seed)
    if n_interactions < 5 * n_users:
        raise ValueError(f'{n_interactions} interactions cannot give {n_users} users 5 each')
    activity = rng.pareto(2.0, n_users) + 1.0
    extra = rng.multinomial(n_interactions - 5 * n_users, activity / activity.sum())
    lengths = np.minimum(5 + extra, n_items // 2)
    lengths[0] += n_interactions - lengths.sum()  # exact total (user 0 absorbs the rounding)
    popularity = 1.0 / (np.arange(n_items) + 10.0)
    popularity = rng.permutation(popularity / popularity.sum())
    log_pop = np.log(popularity)
    users, items = [], []
    for start in range(0, n_users, 512):  # distinct items per user: Gumbel top-k per block
        block = lengths[start:start + 512]
        keys = log_pop[None, :] + rng.gumbel(size=(block.size, n_items))
        top = np.argsort(-keys, axis=1)[:, :block.max()]
        take = np.arange(top.shape[1])[None, :] < block[:, None]
        users.append(np.broadcast_to(np.arange(start, start + block.size)[:, None],
                                     top.shape)[take])
        items.append(top[take])
    users, items = np.concatenate(users), np.concatenate(items)
    # Per user, the last max(1, round(n/10)) rows are test, the ones before as many valid (as
    # MMRec's chronological 8:1:1 split gives it for short histories: ~74% train at Baby scale).
    position = np.arange(users.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    from_end = np.repeat(lengths, lengths) - position  # 1 for a user's last row
    held = np.repeat(np.maximum(1, np.rint(lengths / 10)).astype(int), lengths)
    label = np.where(from_end <= held, 2, np.where(from_end <= 2 * held, 1, 0))
    split = lambda k: Interactions(users[label == k].astype(np.int32),
                                   items[label == k].astype(np.int32))
    factors = rng.standard_normal((n_items, 16)).astype(np.float32)
    image = np.maximum(factors @ rng.standard_normal((16, image_dim)).astype(np.float32)
                       + rng.standard_normal((n_items, image_dim), dtype=np.float32) + 0.5, 0)
    image[:, 0] += 1e-3
    text = factors @ rng.standard_normal((16, text_dim)).astype(np.float32) \
        + rng.standard_normal((n_items, text_dim), dtype=np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return MMRecDataset(name, n_users, n_items, split(0), split(1), split(2),
                        image.astype(np.float32), text.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Machine measurements
# ----------------------------------------------------------------------------------------------

def gemm_rate(dtype: str = 'float32', n: int = 2048, repeats: int = 5, rounds: int = 3) -> float:
    """Best-of-`rounds` FLOP/s of an (n, n) @ (n, n) matmul on the default device (float32, or
    bfloat16 inputs with float32 accumulation)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = float('inf')
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(repeats):
            f(a).block_until_ready()
        best = min(best, (time.perf_counter() - t) / repeats)
    return 2 * n ** 3 / best


def tower_flops(n_items: int, dims, dim: int = 64) -> float:
    """Forward + weight-gradient FLOPs of the three towers over all items, per batch."""
    per = sum(2 * n_items * (d * 4 * dim + 4 * dim * dim) for d in dims)
    return 2 * per  # forward and weight gradients (features are constants: no input gradients)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports kilobytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == 'darwin' else peak * 1024)


def device_peak_bytes(devices) -> Optional[int]:
    """The largest per-device peak memory, where the backend reports it (GPU/TPU), else None."""
    peaks = []
    for d in devices:
        stats = d.memory_stats() if hasattr(d, 'memory_stats') else None
        if stats and 'peak_bytes_in_use' in stats:
            peaks.append(int(stats['peak_bytes_in_use']))
    return max(peaks) if peaks else None


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------

def bench_config(args):
    """The reference's default point (configs/lirdrec.py: the repository's default options)
    with this run's speed options."""
    from configs import lirdrec as lirdrec_config
    cfg = lirdrec_config.get_config('synthetic')
    cfg.model.matmul_dtype = args.matmul_dtype
    cfg.model.transposed_features = args.transposed_features
    cfg.model.cpu_dot = args.cpu_dot
    cfg.graph.spmm_impl = args.spmm_impl
    cfg.graph.spmm_chunk_size = args.spmm_chunk_size
    cfg.train.scan_epoch = not args.no_scan_epoch
    cfg.parallel.num_devices = args.devices
    return grid.expand_grid(cfg)[0].config


def _setup(cfg, data, partitioner, seed_offset: int = 0):
    ds = data.dataset
    options = train.run_options(cfg)
    model = train.create_model(cfg.model, ds.n_users, ds.n_items, partitioner)
    optimizer = optim.create_optimizer()
    features = train.place_features(partitioner, data.features, options)
    item_graph = train.create_item_graph(data, int(cfg.model.knn_k),
                                         float(cfg.model.mm_image_weight))
    graphs = train.place_graphs(partitioner, lirdrec.Graphs(data.norm_adj, item_graph), options)
    state = train.place_state(partitioner, train.create_train_state(
        jax.random.PRNGKey(seed_offset), model, optimizer, features, graphs))
    return options, model, optimizer, features, graphs, state


def _time_epochs(cfg, data, partitioner, n_epochs: int) -> dict:
    """Compile, then `n_epochs` epochs and one evaluation (valid + test), timed."""
    options, model, optimizer, features, graphs, state = _setup(cfg, data, partitioner)
    scalars = train.step_scalars(0.9, 0.1, float(cfg.optim.learning_rate),
                                 float(cfg.model.reg_weight))
    batches = sampling.epoch_batches(sampling.epoch_rng(0, 0), data.sampler,
                                     int(cfg.train.batch_size))
    t = time.perf_counter()
    if options.scan_epoch:
        epoch_fn = train.make_train_epoch(model, optimizer, partitioner,
                                          options.compiler_options)
        epoch_fn.lower(state, train.place_batches(partitioner, batches), features, graphs,
                       scalars).compile()
        run = lambda s, b, e: train.run_epoch_scanned(epoch_fn, s, b, features, graphs, scalars,
                                                      e, partitioner)
    else:
        step = train.make_train_step(model, optimizer, partitioner, options.compiler_options)
        first = train.Batch(*(a[0] for a in train.place_batches(partitioner, batches)))
        step.lower(state, first, features, graphs, scalars).compile()
        run = lambda s, b, e: train.run_epoch(step, s, b, features, graphs, scalars, e,
                                              partitioner)
    compile_s = time.perf_counter() - t
    epochs = []
    for e in range(n_epochs):
        batches = sampling.epoch_batches(sampling.epoch_rng(0, e), data.sampler,
                                         int(cfg.train.batch_size))
        t = time.perf_counter()
        state, _ = run(state, batches, e)
        epochs.append(time.perf_counter() - t)
    evals = []
    for _ in range(EVAL_REPEATS + 1):  # the first includes compiling the ranking
        t = time.perf_counter()
        train.evaluate_splits(state.user_emb, state.item_emb, data, cfg.eval, partitioner)
        evals.append(time.perf_counter() - t)
    return {'compile_seconds': compile_s, 'epoch_seconds': epochs,
            'eval_seconds': min(evals[1:]), 'eval_first_seconds': evals[0],
            'n_batches': int(batches.users.shape[0]), 'params': count_params(state.params)}


def _time_sweep(cfg, data, partitioner, n_points: int) -> dict:
    """One epoch of `n_points` points (different seeds) vmapped, after compilation."""
    import tempfile
    from pathlib import Path
    cfgs = []
    for i in range(n_points):
        c = cfg.copy_and_resolve_references()
        c.train.seed = int(cfg.train.seed) + i
        c.train.epochs = 2
        c.train.eval_step = 1000  # time training only
        cfgs.append(c)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        results = sweep.train_group(cfgs, data, [Path(d) / str(i) for i in range(n_points)],
                                    partitioner=partitioner,
                                    labels=[f'sweep point {i}' for i in range(n_points)])
        total = time.perf_counter() - t
    seconds = [r['history'][-1]['train_seconds'] for r in results]
    return {'points': n_points, 'epoch_seconds': seconds[0], 'first_epoch_seconds':
            results[0]['history'][0]['train_seconds'], 'total_seconds': total}


def run_benchmark(args) -> dict:
    n_users, n_items, n_inter = SCALES[args.scale]
    t = time.perf_counter()
    dataset = synthetic_dataset(n_users, n_items, n_inter, name=args.scale)
    generate_s = time.perf_counter() - t
    t = time.perf_counter()
    data = train.prepare_data(dataset)
    prepare_s = time.perf_counter() - t
    cfg = bench_config(args)
    partitioner = train.create_partitioner(cfg.parallel)
    rate_before = gemm_rate('float32')
    timing = _time_epochs(cfg, data, partitioner, args.epochs)
    rate_after = gemm_rate('float32')
    rate = max(rate_before, rate_after)
    flops = tower_flops(n_items, [IMAGE_DIM, TEXT_DIM, IMAGE_DIM + TEXT_DIM]) \
        * timing['n_batches']
    floor = flops / (rate * partitioner.n_devices)
    result = {
        'scale': args.scale, 'users': n_users, 'items': n_items, 'interactions': n_inter,
        'train_rows': int(dataset.train.users.size),
        'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores',
        'jax': jax.__version__, 'backend': parallel.platform(),
        'devices': partitioner.describe(),
        'options': dict(train.run_options(cfg)._asdict()),
        'generate_seconds': generate_s, 'prepare_seconds': prepare_s, **timing,
        'epoch_min_seconds': min(timing['epoch_seconds']),
        'gemm_gflops_float32': rate / 1e9, 'gemm_gflops_before_after': [rate_before / 1e9,
                                                                       rate_after / 1e9],
        'tower_gflop_per_epoch': flops / 1e9, 'floor_seconds_float32': floor,
        'epoch_over_floor': min(timing['epoch_seconds']) / floor,
    }
    if args.matmul_dtype == 'bfloat16':
        bf16 = gemm_rate('bfloat16')
        result['gemm_gflops_bfloat16'] = bf16 / 1e9
        result['floor_seconds_bfloat16'] = flops / (bf16 * partitioner.n_devices)
        result['epoch_over_bfloat16_floor'] = result['epoch_min_seconds'] \
            / result['floor_seconds_bfloat16']
    if args.sweep_points > 1:
        s = _time_sweep(cfg, data, partitioner, args.sweep_points)
        s['sequential_estimate_seconds'] = args.sweep_points * result['epoch_min_seconds']
        s['speedup'] = s['sequential_estimate_seconds'] / s['epoch_seconds']
        result['sweep'] = s
    result['peak_rss_bytes'] = peak_rss_bytes()
    result['device_peak_bytes'] = device_peak_bytes(partitioner.mesh.devices.flat)
    if args.reference:
        result['reference'] = _reference(args, dataset)
    return result


def _reference(args, dataset) -> dict:
    """The PyTorch reference on the same data, via lirdrec_jax.parity.reference (hook).

    `run_reference_benchmark(path, dataset, args) -> dict` is expected to return any of the keys
    'compile_seconds', 'epoch_seconds' (a list), 'eval_seconds', 'peak_rss_bytes', 'metrics';
    ratios are printed for the ones present.
    """
    try:
        from lirdrec_jax.parity.reference import run_reference_benchmark
    except ImportError as err:
        raise SystemExit(f'error: --reference needs lirdrec_jax.parity.reference.'
                         f'run_reference_benchmark, which is not available ({err})')
    return run_reference_benchmark(args.reference, dataset, args)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def _gb(n) -> str:
    return 'n/a (backend does not report it)' if n is None else f'{n / 2 ** 30:.2f} GB'


def format_report(r: dict) -> str:
    epochs = ', '.join(f'{s:.2f}' for s in r['epoch_seconds'])
    lines = [
        f'machine: {r["machine"]}; jax {r["jax"]} on {r["backend"]}; {r["devices"]}',
        f'data ({r["scale"]} scale, synthetic): {r["users"]} users, {r["items"]} items, '
        f'{r["interactions"]} interactions ({r["train_rows"]} train rows, {r["n_batches"]} '
        f'batches of 2048); features {IMAGE_DIM}-d image + {TEXT_DIM}-d text',
        f'options: {r["options"]}',
        '',
        f'{"what":40s} {"ours":>12s}',
        '-' * 53,
        f'{"generate + prepare data (s)":40s} {r["generate_seconds"] + r["prepare_seconds"]:12.1f}',
        f'{"compile train step (s)":40s} {r["compile_seconds"]:12.2f}',
        f'{"training epoch, best (s)":40s} {r["epoch_min_seconds"]:12.2f}',
        f'{"evaluation valid + test, best of 3 (s)":40s} {r["eval_seconds"]:12.2f}',
        f'{"  first evaluation, with compile (s)":40s} {r["eval_first_seconds"]:12.2f}',
        f'{"peak host RSS":40s} {_gb(r["peak_rss_bytes"]):>12s}',
        f'{"peak device memory":40s} {_gb(r["device_peak_bytes"]):>12s}',
        f'{"parameters":40s} {r["params"]:12,d}',
        f'{"GEMM rate float32 (GFLOP/s, best)":40s} {r["gemm_gflops_float32"]:12.0f}',
        f'{"towers: GFLOP per epoch":40s} {r["tower_gflop_per_epoch"]:12.0f}',
        f'{"floor: epoch at GEMM rate (s)":40s} {r["floor_seconds_float32"]:12.2f}',
        f'{"epoch / floor":40s} {r["epoch_over_floor"]:12.2f}x',
    ]
    if 'floor_seconds_bfloat16' in r:
        lines += [f'{"GEMM rate bfloat16 (GFLOP/s, best)":40s} {r["gemm_gflops_bfloat16"]:12.0f}',
                  f'{"epoch / bfloat16 floor":40s} {r["epoch_over_bfloat16_floor"]:12.2f}x']
    if 'sweep' in r:
        s = r['sweep']
        lines += [f'{"vmapped epoch, " + str(s["points"]) + " points (s)":40s} '
                  f'{s["epoch_seconds"]:12.2f}',
                  f'{"  sequential: points x epoch (s)":40s} '
                  f'{s["sequential_estimate_seconds"]:12.2f}',
                  f'{"  speed-up":40s} {s["speedup"]:12.2f}x']
    lines += ['', f'epochs (s): {epochs}; GEMM GFLOP/s before/after training: '
              + ', '.join(f'{g:.0f}' for g in r['gemm_gflops_before_after'])
              + ' (a large gap means a noisy machine)']
    if 'reference' in r:
        lines += ['', _reference_table(r, r['reference'])]
    if r['backend'] == 'cpu':
        lines += ['', 'On a GPU/TPU the same command uses every local device (item features '
                  'and tower work split over them, users split for evaluation), reports peak '
                  'device memory, and measures the floor on the device.']
    return '\n'.join(lines)


def _reference_table(ours: dict, ref: dict) -> str:
    rows = [('compile (s)', ours.get('compile_seconds'), ref.get('compile_seconds')),
            ('training epoch (s)', ours.get('epoch_min_seconds'),
             min(ref['epoch_seconds']) if ref.get('epoch_seconds') else None),
            ('evaluation valid + test (s)', ours.get('eval_seconds'), ref.get('eval_seconds')),
            ('peak host RSS (GB)', ours.get('peak_rss_bytes', 0) / 2 ** 30,
             ref['peak_rss_bytes'] / 2 ** 30 if ref.get('peak_rss_bytes') else None)]
    lines = [f'{"what":32s} {"ours":>10s} {"reference":>10s} {"ref / ours":>10s}', '-' * 65]
    for name, a, b in rows:
        if a is None or b is None:
            continue
        lines.append(f'{name:32s} {a:10.2f} {b:10.2f} {b / a:10.2f}')
    if ref.get('parameters') and ours.get('params'):
        lines.append(f'{"parameters (D4 tables excluded)":32s} {ours["params"]:10d} '
                     f'{ref["parameters"]:10d} '
                     f'{ref["parameters"] / ours["params"]:10.2f}')
    lines.append('(the reference runs in this process after ours: its peak memory is not '
                 'separable; its model construction took '
                 f'{ref.get("construct_seconds", float("nan")):.1f} s)')
    return '\n'.join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='python -m lirdrec_jax.bench',
                                description=__doc__.splitlines()[0])
    p.add_argument('--scale', choices=sorted(SCALES), default='baby')
    p.add_argument('--epochs', type=int, default=2, help='training epochs to time')
    p.add_argument('--json', help='also write the results to this JSON file')
    p.add_argument('--matmul_dtype', choices=('float32', 'bfloat16'), default='float32')
    p.add_argument('--fast', action='store_true',
                   help='the CPU speed options (configs/lirdrec.py:fast): --spmm_impl '
                        'segment_sum --transposed_features, and --cpu_dot eigen in float32')
    p.add_argument('--spmm_impl', choices=('segment_sum', 'bcoo'), default='bcoo')
    p.add_argument('--spmm_chunk_size', type=int, default=-1)
    p.add_argument('--transposed_features', action='store_true')
    p.add_argument('--cpu_dot', choices=('xla', 'eigen'), default='xla',
                   help="XLA:CPU GEMM kernels of the training step (model.cpu_dot)")
    p.add_argument('--no_scan_epoch', action='store_true',
                   help='one dispatch per batch instead of one scan per epoch')
    p.add_argument('--devices', type=int, default=0, help='0 = all devices')
    p.add_argument('--sweep_points', type=int, default=0,
                   help='also time one vmapped epoch of this many points')
    p.add_argument('--reference', metavar='PATH',
                   help='a checkout of enoche/LIRDRec: run it on the same data and print ratios')
    args = p.parse_args(argv)
    if args.fast:  # the options of configs/lirdrec.py's `fast` variant, defined there once
        from configs import lirdrec as lirdrec_config
        fast = lirdrec_config.cpu_fast(lirdrec_config.base_config())
        args.spmm_impl = fast.graph.spmm_impl
        args.transposed_features = fast.model.transposed_features
        if args.matmul_dtype == 'float32':  # Eigen dots are a config error with bfloat16
            args.cpu_dot = fast.model.cpu_dot
    if args.epochs < 1:
        p.error('--epochs must be >= 1')
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run_benchmark(args)
    print(format_report(result), flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2, sort_keys=True, default=str)
    return result


if __name__ == '__main__':
    main()
