"""Time one LIRDRec training epoch and one evaluation at Amazon-Baby scale on random data.

  python bench/epoch_time.py [--users 19445 --items 7050 --interactions 160792 --epochs 2]

Prints the compile time, the time of each epoch, the evaluation time (valid + test) and the
epoch time as a multiple of the dense-matmul floor measured on this machine (GEMM rate x the
towers' FLOP count). Data are random (no signal): this measures speed, not accuracy.
"""
import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from lirdrec_jax import evaluation, optim, sampling, train
from lirdrec_jax.data import Interactions, MMRecDataset
from lirdrec_jax.models import lirdrec
from configs import lirdrec as lirdrec_config


def random_dataset(n_users, n_items, n_inter, image_dim, text_dim, seed=0) -> MMRecDataset:
    rng = np.random.default_rng(seed)
    users = np.concatenate([np.arange(n_users), rng.integers(0, n_users, n_inter - n_users)])
    items = np.concatenate([rng.permutation(np.resize(np.arange(n_items), n_users)),
                            rng.integers(0, n_items, n_inter - n_users)]).astype(np.int32)
    label = rng.choice(3, n_inter, p=[0.70, 0.15, 0.15])  # ~119k train rows at Baby scale
    label[:n_users] = 0  # every user trains
    split = lambda k: Interactions(users[label == k].astype(np.int32), items[label == k])
    return MMRecDataset('bench', n_users, n_items, split(0), split(1), split(2),
                        rng.random((n_items, image_dim), dtype=np.float32),
                        rng.standard_normal((n_items, text_dim)).astype(np.float32))


def gemm_rate(n=2048, repeats=5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t)


def tower_flops(n_items, dims, dim=64) -> float:
    """Forward + weight-gradient FLOPs of the three towers over all items, per batch."""
    per = sum(2 * n_items * (d * 4 * dim + 4 * dim * dim) for d in dims)
    return 2 * per  # forward and weight gradients (features are constants: no input gradients)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--users', type=int, default=19445)
    p.add_argument('--items', type=int, default=7050)
    p.add_argument('--interactions', type=int, default=160792)
    p.add_argument('--image_dim', type=int, default=4096)
    p.add_argument('--text_dim', type=int, default=384)
    p.add_argument('--epochs', type=int, default=2)
    args = p.parse_args()

    ds = random_dataset(args.users, args.items, args.interactions, args.image_dim, args.text_dim)
    t = time.perf_counter()
    data = train.prepare_data(ds)
    prep = time.perf_counter() - t
    cfg = lirdrec_config.get_config('baby')
    point = cfg.model
    model = lirdrec.LIRDRec(ds.n_users, ds.n_items, 64, 2, 1)
    opt = optim.create_optimizer()
    item_graph = train.create_item_graph(data, 10, 0.1)
    graphs = lirdrec.Graphs(data.norm_adj, item_graph)
    state = train.create_train_state(jax.random.PRNGKey(0), model, opt, data.features, graphs)
    step = train.make_train_step(model, opt)
    scalars = train.StepScalars(*(jnp.float32(v) for v in (0.9, 0.1, 1e-4, 1e-3)))
    batches = sampling.epoch_batches(sampling.epoch_rng(0, 0), data.sampler, 2048)
    t = time.perf_counter()
    first = train.Batch(*(jnp.asarray(a[0]) for a in batches))
    compiled = step.lower(state, first, data.features, graphs, scalars).compile()
    compile_s = time.perf_counter() - t
    del point, compiled
    epoch_times = []
    for e in range(args.epochs):
        batches = sampling.epoch_batches(sampling.epoch_rng(0, e), data.sampler, 2048)
        t = time.perf_counter()
        state, loss = train.run_epoch(step, state, batches, data.features, graphs, scalars, e)
        epoch_times.append(time.perf_counter() - t)
    t = time.perf_counter()
    for split in (data.valid, data.test):
        evaluation.evaluate_full_sort(state.user_emb, state.item_emb, split)
    eval_s = time.perf_counter() - t
    n_batches = batches.users.shape[0]
    floor = tower_flops(ds.n_items, [args.image_dim, args.text_dim,
                                     args.image_dim + args.text_dim]) * n_batches / gemm_rate()
    print(f'machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
          f'jax {jax.__version__} on {jax.devices()[0].platform}')
    print(f'data: {ds.n_users} users, {ds.n_items} items, {ds.train.users.size} train rows, '
          f'{n_batches} batches of 2048, features {args.image_dim}+{args.text_dim}')
    print(f'prepare (graphs, DCT, splits): {prep:.1f}s   compile: {compile_s:.1f}s')
    for e, s in enumerate(epoch_times):
        print(f'epoch {e}: {s:.1f}s  ({s / floor:.2f}x the {floor:.1f}s GEMM floor)')
    print(f'evaluation valid+test: {eval_s:.2f}s')


if __name__ == '__main__':
    main()
