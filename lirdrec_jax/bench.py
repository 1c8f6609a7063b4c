"""Benchmark one grid point of any model at the scale of MMRec's Amazon datasets, on synthetic data.

  python -m lirdrec_jax.bench --scale baby [--epochs 2] [--json out.json]
  python -m lirdrec_jax.bench --config freedom --scale baby   # another model
  python -m lirdrec_jax.bench --scale baby --fast        # the CPU speed options
  python -m lirdrec_jax.bench --scale clothing --fast --matmul_dtype bfloat16
  python -m lirdrec_jax.bench --scale baby --sweep_points 4      # also: vmapped vs sequential
  python -m lirdrec_jax.bench --scale baby --reference /path/to/LIRDRec   # also the reference

Generates a synthetic dataset with exactly the counts of the chosen scale (Baby 19,445 users /
7,050 items / 160,792 interactions; Sports 35,598 / 18,357 / 296,337; Clothing 39,387 /
23,033 / 278,677), 4096-d image and 384-d text features, skewed item popularity and 5+
interactions per user, split per user like MMRec's chronological 8:1:1 (about 74/13/13), from
the project's one synthetic generator (`lirdrec_jax.synthetic`); this measures speed, not
accuracy. It then trains the config's first grid point (by default LIRDRec's: the reference's
default point, batch 2048, 64-d, two user-item layers) on every visible device and prints:
compile time, training epoch time, evaluation time (valid + test), peak host RSS and device
memory (where the backend reports it), parameter count, the dense-matmul floor measured on this
machine (GEMM rate x the model's analytic FLOP count, `flops_per_batch`) and the epoch time as
a multiple of it; a table; and the same as JSON (--json). With --reference, the model's parity
module times the PyTorch reference on the same data.

On a GPU or TPU the same command measures the same quantities on all local devices (the item
features and the towers' work split over them, users split for evaluation), reports each
device's peak memory from `memory_stats()`, and computes the floor from the GEMM rate it
measures on one device times the device count.
"""
import argparse
import importlib
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

from lirdrec_jax import cli, grid, model_inputs, models, parallel, sampling, train
from lirdrec_jax.data import MMRecDataset
from lirdrec_jax.models import base

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
                      name: str = 'bench', input_files=()) -> MMRecDataset:
    """Exactly these counts, Amazon-like shape: see `lirdrec_jax.synthetic.generate_exact_counts`.
    A model's extra input files (`input_files`) get their stand-ins in `extra`
    (`model_inputs.with_no_llm_inputs`; sparse ones from generated item texts)."""
    from lirdrec_jax import synthetic
    texts = any(getattr(f, 'kind', 'dense') == 'sparse' for f in input_files)
    data = synthetic.generate_exact_counts(n_users, n_items, n_interactions, seed=seed,
                                           image_dim=image_dim, text_dim=text_dim,
                                           item_text=texts)
    return model_inputs.with_no_llm_inputs(synthetic.to_dataset(data, name), input_files,
                                           data.item_text)


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
    """The config's first grid point (`--config`, by default LIRDRec's defaults: the
    reference's default point) with this run's speed options."""
    spec = args.config + (',fast' if args.fast and ':' in args.config else
                          ':fast' if args.fast else '')
    cfg = cli.load_config(spec)
    if args.matmul_dtype != 'float32' or args.transposed_features:
        if 'matmul_dtype' not in cfg.model:
            raise SystemExit(f'error: --matmul_dtype/--transposed_features: model '
                             f'{cfg.model_name!r} has no such config fields')
    if 'matmul_dtype' in cfg.model:
        cfg.model.matmul_dtype = args.matmul_dtype
        if args.matmul_dtype == 'bfloat16':
            cfg.model.cpu_dot = 'xla'  # Eigen dots are a config error with bfloat16
        cfg.model.transposed_features = cfg.model.transposed_features or args.transposed_features
    if args.cpu_dot is not None:
        cfg.model.cpu_dot = args.cpu_dot
    if args.spmm_impl is not None:
        cfg.graph.spmm_impl = args.spmm_impl
    if args.spmm_chunk_size is not None:
        cfg.graph.spmm_chunk_size = args.spmm_chunk_size
    cfg.train.scan_epoch = not args.no_scan_epoch
    cfg.parallel.num_devices = args.devices
    return grid.expand_grid(cfg)[0].config


def _time_epochs(cfg, data, partitioner, n_epochs: int) -> dict:
    """Compile, then `n_epochs` epochs and one evaluation (valid + test), timed."""
    setup = train.setup_point(cfg, data, partitioner)
    model, state, frozen = setup.model, setup.state, setup.frozen
    fns = train.make_epoch_fns(setup, partitioner, str(cfg.eval.get('embeddings', 'last_batch')))
    kind = sampling.batch_kind(model.batch_kind)
    host = model.host_init(cfg.model)
    draw = lambda e: kind.draw(sampling.epoch_rng(0, e), data.sampler, int(cfg.train.batch_size))

    def epoch_args(e):
        nonlocal host
        host, scalars = train.epoch_scalars(model, cfg, host, e)
        key = jax.random.fold_in(setup.epoch_key, e)
        inputs = train.place_epoch_inputs(
            partitioner, model.epoch_inputs(data.model, cfg.model, key, e), setup.options)
        return (inputs, partitioner.replicate(train.device_scalars(scalars)),
                partitioner.replicate(key))

    batches = draw(0)
    inputs, scalars, key = epoch_args(0)
    t = time.perf_counter()
    if setup.options.scan_epoch:
        fns.epoch.lower(state, train.place_batches(partitioner, batches), frozen, inputs,
                        scalars, key, None, jax.numpy.int32(0)).compile()
    else:
        first = train.place_batches(partitioner, batches)
        fns.step.lower(state, type(first)(*(a[0] for a in first)), frozen, inputs, scalars, key,
                       jax.numpy.int32(0), None).compile()
    compile_s = time.perf_counter() - t
    epochs = []
    for e in range(n_epochs):
        batches = draw(e)
        inputs, scalars, key = epoch_args(e)
        t = time.perf_counter()
        state = fns.start_epoch(state, None)
        state, _ = train.run_epoch(fns, state, batches, frozen, inputs, scalars, key, None, e,
                                   partitioner, setup.options.scan_epoch, show_progress=False)
        epochs.append(time.perf_counter() - t)
    evals = []
    for _ in range(EVAL_REPEATS + 1):  # the first includes compiling the ranking
        t = time.perf_counter()
        users, items = fns.eval_embeddings(state.params, state.carry, frozen, inputs, scalars)
        train.evaluate_splits(users, items, data, cfg.eval, partitioner)
        evals.append(time.perf_counter() - t)
    return {'compile_seconds': compile_s, 'epoch_seconds': epochs,
            'eval_seconds': min(evals[1:]), 'eval_first_seconds': evals[0],
            'n_batches': int(jax.tree.leaves(batches)[0].shape[0]),
            'params': count_params(state.params)}


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
        results = train.train_points(cfgs, data, [Path(d) / str(i) for i in range(n_points)],
                                    partitioner=partitioner,
                                    labels=[f'sweep point {i}' for i in range(n_points)])
        total = time.perf_counter() - t
    seconds = [r['history'][-1]['train_seconds'] for r in results]
    return {'points': n_points, 'epoch_seconds': seconds[0], 'first_epoch_seconds':
            results[0]['history'][0]['train_seconds'], 'total_seconds': total}


def run_benchmark(args) -> dict:
    n_users, n_items, n_inter = SCALES[args.scale]
    cfg = bench_config(args)
    model = models.get_model(cfg.model_name)
    t = time.perf_counter()
    # A model's extra input files (e.g. MLLMRec's LLM-derived matrices, DGVAE's word view) are
    # their no-LLM stand-ins here: the synthetic data has no files, and this measures speed.
    dataset = synthetic_dataset(n_users, n_items, n_inter, name=args.scale,
                                input_files=model.input_files)
    generate_s = time.perf_counter() - t
    t = time.perf_counter()
    data = train.prepare_data(dataset, cfg.model_name)
    prepare_s = time.perf_counter() - t
    partitioner = train.create_partitioner(cfg.parallel)
    rate_before = gemm_rate('float32')
    timing = _time_epochs(cfg, data, partitioner, args.epochs)
    rate_after = gemm_rate('float32')
    rate = max(rate_before, rate_after)
    if model.flops_per_batch is None:
        raise SystemExit(f'error: model {cfg.model_name!r} has no FLOP count (flops_per_batch)')
    size = base.ProblemSize(n_users, n_items, int(dataset.train.users.size),
                            int(cfg.train.batch_size), (IMAGE_DIM, TEXT_DIM),
                            tuple(int(dataset.extra[f.field].shape[1])
                                  for f in model.input_files))
    flops = model.flops_per_batch(cfg.model, size) * timing['n_batches']
    floor = flops / (rate * partitioner.n_devices)
    result = {
        'model': cfg.model_name, 'scale': args.scale, 'users': n_users, 'items': n_items, 'interactions': n_inter,
        'train_rows': int(dataset.train.users.size), 'batch_size': int(cfg.train.batch_size),
        'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores',
        'jax': jax.__version__, 'backend': parallel.platform(),
        'devices': partitioner.describe(),
        'options': dict(train.run_options(cfg)._asdict()),
        'generate_seconds': generate_s, 'prepare_seconds': prepare_s, **timing,
        'epoch_min_seconds': min(timing['epoch_seconds']),
        'gemm_gflops_float32': rate / 1e9, 'gemm_gflops_before_after': [rate_before / 1e9,
                                                                       rate_after / 1e9],
        'gflop_per_epoch': flops / 1e9, 'floor_seconds_float32': floor,
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
        result['reference'] = _reference(args, dataset, cfg)
    return result


def _reference(args, dataset, cfg) -> dict:
    """The PyTorch reference on the same data, through the model's parity module
    (`run_reference_benchmark(path, dataset, args, point_cfg) -> dict`, returning any of the
    keys 'compile_seconds', 'epoch_seconds' (a list), 'eval_seconds', 'peak_rss_bytes',
    'parameters'; ratios are printed for the ones present)."""
    hooks = models.get_model(cfg.model_name).parity
    if hooks is None:
        raise SystemExit(f'error: --reference: model {cfg.model_name!r} has no parity module')
    try:
        module = importlib.import_module(hooks.module)
        run_reference_benchmark = module.run_reference_benchmark
    except (ImportError, AttributeError) as err:
        raise SystemExit(f'error: --reference needs {hooks.module}.run_reference_benchmark, '
                         f'which is not available ({err})')
    return run_reference_benchmark(args.reference, dataset, args, cfg)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def _gb(n) -> str:
    return 'n/a (backend does not report it)' if n is None else f'{n / 2 ** 30:.2f} GB'


def format_report(r: dict) -> str:
    epochs = ', '.join(f'{s:.2f}' for s in r['epoch_seconds'])
    lines = [
        f'model {r["model"]}; machine: {r["machine"]}; jax {r["jax"]} on {r["backend"]}; '
        f'{r["devices"]}',
        f'data ({r["scale"]} scale, synthetic): {r["users"]} users, {r["items"]} items, '
        f'{r["interactions"]} interactions ({r["train_rows"]} train rows, {r["n_batches"]} '
        f'batches of {r.get("batch_size", 2048)}); features {IMAGE_DIM}-d image + {TEXT_DIM}-d '
        'text',
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
        f'{"analytic GFLOP per epoch":40s} {r["gflop_per_epoch"]:12.0f}',
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
        lines += ['', 'On a GPU/TPU the same command uses every local device (the model places '
                  'its inputs, e.g. LIRDRec splits item features and tower work over them; '
                  'users are split for evaluation), reports peak device memory, and measures '
                  'the floor on the device.']
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
        lines.append(f'{"parameters that train":32s} {ours["params"]:10d} '
                     f'{ref["parameters"]:10d} '
                     f'{ref["parameters"] / ours["params"]:10.2f}')
    lines.append('(the reference runs in this process after ours: its peak memory is not '
                 'separable; its model construction took '
                 f'{ref.get("construct_seconds", float("nan")):.1f} s)')
    return '\n'.join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='python -m lirdrec_jax.bench',
                                description=__doc__.splitlines()[0])
    p.add_argument('--config', default='lirdrec',
                   help='built-in config name or config file, [:variant], of the model to time '
                        '(its first grid point)')
    p.add_argument('--scale', choices=sorted(SCALES), default='baby')
    p.add_argument('--epochs', type=int, default=2, help='training epochs to time')
    p.add_argument('--json', help='also write the results to this JSON file')
    p.add_argument('--matmul_dtype', choices=('float32', 'bfloat16'), default='float32')
    p.add_argument('--fast', action='store_true',
                   help="the config's `fast` variant (the CPU speed options, e.g. "
                        'lirdrec:fast)')
    p.add_argument('--spmm_impl', choices=('segment_sum', 'bcoo'), default=None)
    p.add_argument('--spmm_chunk_size', type=int, default=None)
    p.add_argument('--transposed_features', action='store_true')
    p.add_argument('--cpu_dot', choices=('xla', 'eigen'), default=None,
                   help="XLA:CPU GEMM kernels of the training step (model.cpu_dot)")
    p.add_argument('--no_scan_epoch', action='store_true',
                   help='one dispatch per batch instead of one scan per epoch')
    p.add_argument('--devices', type=int, default=0, help='0 = all devices')
    p.add_argument('--sweep_points', type=int, default=0,
                   help='also time one vmapped epoch of this many points')
    p.add_argument('--reference', metavar='PATH',
                   help="a checkout of the model's reference repository (e.g. enoche/LIRDRec): "
                        'run it on the same data and print ratios')
    args = p.parse_args(argv)
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
