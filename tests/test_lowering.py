"""Every program of every model exports for GPU and TPU (jax.export, lowered only: nothing is
compiled for them), XLA's memory and cost analyses agree with sizes computed by hand, and the
CPU-only options are off when the platform is not the CPU."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lirdrec_jax import bench, cli, grid, lowering, models, parallel, train

PLATFORMS = ('cuda', 'tpu')
POINT_PROGRAMS = ('train_step', 'train_epoch', 'start_epoch', 'eval_embeddings', 'eval_topk')
SWEEP_PROGRAMS = ('sweep_start_epoch', 'sweep_step', 'sweep_epoch')


def small_config(name: str, **model_overrides):
    """The model's built-in config, first grid point, with small widths and batches."""
    cfg = grid.expand_grid(cli.load_config(name))[0].config
    for width in ('embedding_size', 'feat_embed_dim'):
        if width in cfg.model:
            cfg.model[width] = 8
    for field, value in model_overrides.items():
        cfg.model[field] = value
    # 36 rows: not a multiple of 8 devices (padded), 40 items neither.
    cfg.train.batch_size = 36
    cfg.eval.topk, cfg.eval.valid_metric, cfg.eval.batch_size = (5, 10), 'recall@10', 16
    return cfg


@functools.lru_cache(maxsize=None)
def small_data(name: str) -> train.PreparedData:
    model = models.get_model(name)
    dataset = bench.synthetic_dataset(60, 40, 500, image_dim=24, text_dim=12, name='tiny',
                                      input_files=model.input_files)
    return train.prepare_data(dataset, name)


def nbytes(x) -> int:
    """Bytes of an array or a ShapeDtypeStruct."""
    return int(np.prod(x.shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize


def without_locations(exported) -> str:
    """The exported module's text without its source locations (which name the caller)."""
    lines = [line for line in exported.mlir_module().splitlines()
             if not line.startswith('#loc')]
    return re.sub(r'\s*loc\(#loc\d*\)', '', '\n'.join(lines))


def flat_args(program):
    return jax.tree.leaves(program.args)


def assert_exported(name, program, exported):
    assert exported.platforms == PLATFORMS, name
    leaves = flat_args(program)
    assert [(tuple(a.shape), a.dtype) for a in exported.in_avals] == \
        [(tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves], name
    assert not exported.ordered_effects and not exported.unordered_effects, name
    # What the module computes: its outputs are what the program returns.
    out = jax.tree.leaves(jax.eval_shape(program.fn, *program.args))
    assert [(tuple(a.shape), a.dtype) for a in exported.out_avals] == \
        [(tuple(x.shape), x.dtype) for x in out], name


@pytest.fixture(scope='module')
def exported_programs():
    """{model: (programs, exported)} built for GPU on one device (cached per model)."""
    cache = {}

    def get(name):
        if name not in cache:
            progs = lowering.programs(small_config(name), small_data(name),
                                      parallel.Partitioner(1), sweep_points=2, platform='gpu')
            cache[name] = progs, lowering.export_all(progs, PLATFORMS)
        return cache[name]

    return get


@pytest.mark.parametrize('name', sorted(models.REGISTRY))
def test_every_program_of_every_model_exports_for_gpu_and_tpu(name, exported_programs):
    progs, exported = exported_programs(name)
    expected = POINT_PROGRAMS + SWEEP_PROGRAMS
    if models.get_model(name).score is None:
        expected += ('eval_item_order',)
    assert sorted(progs) == sorted(expected)
    for program_name, program in progs.items():
        assert_exported(program_name, program, exported[program_name])
        assert lowering.module_bytes(exported[program_name]) > 0
    # The vmapped programs carry a leading point axis of 2 on the state.
    step, sweep_step = flat_args(progs['train_step'])[0], flat_args(progs['sweep_step'])[0]
    assert sweep_step.shape == (2,) + step.shape


def test_a_host_callback_is_found_and_refused():
    """The portability check is not vacuous: a program with a pure_callback fails it, whether
    jax.export refuses the callback's custom call itself or the scan of the module finds it."""
    def host_sqrt(x):
        return jax.pure_callback(np.sqrt, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    program = lowering.Program('callback', jax.jit(host_sqrt), (jnp.ones(3),))
    with pytest.raises(lowering.ExportError, match='callback'):
        lowering.export_program(program, PLATFORMS)


def test_custom_call_targets_are_listed():
    """A sharding constraint lowers to the custom call 'Sharding' (allowed by jax.export)."""
    mesh_1 = parallel.Partitioner(1)
    fn = jax.jit(lambda x: jax.lax.with_sharding_constraint(x * 2, mesh_1.replicated))
    exported = jax.export.export(fn, platforms=PLATFORMS)(jnp.ones(4))
    targets = lowering.custom_call_targets(exported)
    assert set(targets) <= {'Sharding'}
    lowering.check_portable('constraint', exported)  # allowed: no host target


def test_memory_analysis_counts_the_arguments_and_outputs_of_the_train_step(
        exported_programs):
    progs, exported = exported_programs('lirdrec')
    program = progs['train_step']
    stats = lowering.compiled_stats(program)
    leaves = flat_args(program)
    # jit drops arguments the step never reads (LIRDRec's loss ignores the carry and the noise
    # key); the export records which ones it kept.
    kept = exported['train_step'].module_kept_var_idx
    assert len(kept) < len(leaves)
    assert stats['argument_bytes'] == sum(nbytes(leaves[i]) for i in kept)
    outputs = jax.tree.leaves(jax.eval_shape(program.fn, *program.args))
    # Several outputs are one XLA tuple, whose index table holds a pointer (8 bytes) per output.
    assert len(outputs) > 1
    assert stats['output_bytes'] == sum(nbytes(x) for x in outputs) + 8 * len(outputs)
    # The state is donated: its buffers are reused for the new state.
    state_bytes = sum(nbytes(x) for x in jax.tree.leaves(program.args[0]))
    assert 0 < stats['alias_bytes'] <= state_bytes
    assert stats['peak_bytes'] == (stats['argument_bytes'] + stats['output_bytes']
                                   + stats['temp_bytes'] - stats['alias_bytes'])
    assert stats['flops'] > 0 and stats['bytes_accessed'] > 0


def test_cost_analysis_of_a_matmul_is_two_m_n_k_flops():
    m, k, n = 24, 40, 16
    program = lowering.Program('matmul', jax.jit(jnp.matmul),
                               (jax.ShapeDtypeStruct((m, k), jnp.float32),
                                jax.ShapeDtypeStruct((k, n), jnp.float32)))
    stats = lowering.compiled_stats(program)
    assert stats['flops'] == 2 * m * n * k
    assert stats['argument_bytes'] == 4 * (m * k + k * n)
    assert stats['output_bytes'] == 4 * m * n


def test_cpu_only_options_are_off_on_an_accelerator_with_one_note(monkeypatch, capsys):
    fast = small_config('lirdrec', cpu_dot='eigen', transposed_features=True)
    plain = small_config('lirdrec')
    # On the CPU they are on: the step reads transposed feature copies.
    on_cpu = lowering.programs(fast, small_data('lirdrec'), parallel.Partitioner(1))
    features = on_cpu['train_step'].args[2].features
    assert features.image_t is not None and features.image_t.shape == (24, 40)
    assert train.RunOptions(cpu_dot='eigen').compiler_options is not None or \
        not parallel._cpu_option_supported(next(iter(parallel._NO_YNN_DOTS)))
    capsys.readouterr()

    monkeypatch.setattr(parallel, 'platform', lambda: 'gpu')
    monkeypatch.setattr(train, '_noted_cpu_options', set())
    off = train.for_platform(fast)
    assert (off.model.cpu_dot, off.model.transposed_features) == ('xla', False)
    assert (fast.model.cpu_dot, fast.model.transposed_features) == ('eigen', True)  # a copy
    assert train.for_platform(plain) is plain
    assert train.run_options(off).compiler_options is None
    on_gpu = lowering.programs(fast, small_data('lirdrec'), parallel.Partitioner(1))
    assert on_gpu['train_step'].args[2].features.image_t is None
    notes = capsys.readouterr().out.splitlines()
    assert notes == ["note: model.cpu_dot='eigen' is a CPU option; ignored on gpu",
                     "note: model.transposed_features=True is a CPU option; ignored on gpu"]
    # The exported step does not depend on them: the same module as without the options.
    a = lowering.export_program(on_gpu['train_step'], PLATFORMS)
    b = lowering.export_program(
        lowering.programs(plain, small_data('lirdrec'), parallel.Partitioner(1))['train_step'],
        PLATFORMS)
    assert a.in_avals == b.in_avals and without_locations(a) == without_locations(b)


def test_command_prints_one_line_per_program(monkeypatch, capsys):
    monkeypatch.setattr(lowering, '_synthetic_data', lambda cfg, scale: small_data(cfg.model_name))
    monkeypatch.setattr(lowering, 'point_config',
                        lambda cfg: small_config(cfg.model_name))
    assert lowering.main(['--config', 'mllmrec', '--sweep_points', '2']) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line.split() for line in lines[2:]}
    assert sorted(table) == sorted(POINT_PROGRAMS + SWEEP_PROGRAMS + ('eval_item_order',))
    for row in table.values():
        assert row[1:4:2] == ['cuda,tpu', 'KiB'] and row[4] == 'peak' and row[6] == 'MiB'
        assert float(row[2]) > 0 and float(row[5]) >= 0 and row[8] == 'GFLOP'
    assert float(table['train_step'][5]) > 0 and float(table['train_step'][7]) > 0


@pytest.mark.parametrize('argv, message', [
    (['--platforms', 'cuda,metal'], "--platforms 'cuda,metal'"),
    (['--platforms', 'cpu,tpu'], "--platforms 'cpu,tpu': export for cpu and for accelerators "
                                 'separately'),
])
def test_command_rejects_bad_platforms(argv, message, capsys):
    with pytest.raises(SystemExit, match=re.escape('error: ' + message)):
        lowering.main(argv)


def test_lirdrec_bfloat16_keeps_transposed_copies_on_the_cpu_only():
    """On the CPU bfloat16 features come with transposed copies (its fast weight gradient);
    built for an accelerator they do not (half the feature memory), and the bfloat16 products
    are the same in number and kind, forward and kernel gradient."""
    cfg = small_config('lirdrec', matmul_dtype='bfloat16')
    data = small_data('lirdrec')
    on_cpu = lowering.programs(cfg, data, parallel.Partitioner(1), platform='cpu')
    on_gpu = lowering.programs(cfg, data, parallel.Partitioner(1), platform='gpu')
    cpu_features = on_cpu['train_step'].args[2].features
    gpu_features = on_gpu['train_step'].args[2].features
    assert cpu_features.image_t is not None and cpu_features.image_t.dtype == jnp.bfloat16
    assert gpu_features.image_t is None and gpu_features.text_t is None
    assert [x.dtype for x in gpu_features[:3]] == [jnp.bfloat16] * 3
    assert nbytes(cpu_features.image) == nbytes(gpu_features.image) == 40 * 24 * 2

    def bf16_dots(program):
        text = program.fn.lower(*program.args).as_text()
        return sorted(re.findall(r'stablehlo\.dot_general[^\n]*: \((tensor<[^>]*bf16>), '
                                 r'(tensor<[^>]*bf16>)\)', text))
    # Three towers' first layers: forward and kernel gradient each, from either layout.
    assert len(bf16_dots(on_gpu['train_step'])) == len(bf16_dots(on_cpu['train_step'])) == 6
