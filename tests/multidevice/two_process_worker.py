"""One process of the two-process test (tests/test_multiprocess.py): joins the other through
jax.distributed (as a launcher on GPU hosts would arrange it, via environment variables) and
runs a small experiment on the 2 x 2 simulated devices of both processes.

  python tests/multidevice/two_process_worker.py PROCESS_ID PORT DATA_DIR OUT_DIR
"""
import os
import sys

process_id, port, data_dir, out_dir = sys.argv[1:5]
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
os.environ['JAX_COORDINATOR_ADDRESS'] = f'localhost:{port}'
os.environ['JAX_NUM_PROCESSES'] = '2'
os.environ['JAX_PROCESS_ID'] = process_id
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.test_multiprocess import experiment_config  # noqa: E402
from lirdrec_jax import experiment  # noqa: E402

summary = experiment.run(experiment_config(data_dir, out_dir))
import jax  # noqa: E402
print(f'process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices, '
      f'finished={summary["finished"]}', flush=True)
