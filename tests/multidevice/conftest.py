"""Tests that need several (simulated) devices.

They run in their own pytest process, started by tests/test_multidevice.py with
XLA_FLAGS=--xla_force_host_platform_device_count=N (which must be set before JAX starts) and
LIRDREC_MULTIDEVICE=1; in the normal test process they are not collected.
"""
import os

if os.environ.get('LIRDREC_MULTIDEVICE') != '1':
    collect_ignore_glob = ['*.py']
