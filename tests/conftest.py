"""Test-session setup: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from pathlib import Path  # noqa: E402  (after the environment above)

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory):
  """One persistent XLA compilation cache for this test session (in-process and subprocesses).

  Set ``TWINS_TEST_COMPILATION_CACHE`` to keep it between sessions.
  """
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  path = os.environ.get('TWINS_TEST_COMPILATION_CACHE') or str(
      tmp_path_factory.getbasetemp() / 'jax_compilation_cache')
  Path(path).mkdir(parents=True, exist_ok=True)
  old_dir = jax.config.jax_compilation_cache_dir
  old_min = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  cc.reset_cache()  # the cache is bound to a directory when first used
  yield path
  jax.config.update('jax_compilation_cache_dir', old_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', old_min)
  cc.reset_cache()
