"""Runs tests/multidevice/ in fresh pytest processes with 4 and 8 simulated CPU devices.

XLA_FLAGS=--xla_force_host_platform_device_count=N only takes effect before JAX starts, so
these tests cannot run in this process; the child processes report their own failures, shown
here.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_multidevice_pytest(n_devices: int, *select: str) -> subprocess.CompletedProcess:
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'LIRDREC_MULTIDEVICE': '1',
           'XLA_FLAGS': (os.environ.get('XLA_FLAGS', '') +
                         f' --xla_force_host_platform_device_count={n_devices}').strip()}
    return subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                           'tests/multidevice', *select], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize('n_devices,select', [
    # The export test runs once, on 8 devices (the 4-device run would repeat it).
    (4, ('-k', 'not exports_with_its_arguments_split')),
    (8, ('-k', 'the_process_sees or data_parallel_training or compiled_step'
               ' or exports_with_its_arguments_split')),
])
def test_multidevice_suite(n_devices, select):
    out = run_multidevice_pytest(n_devices, *select)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert ' passed' in out.stdout and 'skipped' not in out.stdout, out.stdout[-2000:]
