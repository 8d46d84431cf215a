"""bench/gpu.py, the one-script accelerator check, in its --smoke mode."""

import json
import math
import subprocess
import sys

from launcher.local_cluster import REPO_ROOT

STRATEGIES = ('default', 'mirrored')
RATES = ('train_steps_per_s_in_memory', 'train_steps_per_s_live_table',
         'pipeline_batches_per_s')
RATIOS = {
    'live_over_in_memory_default', 'live_over_in_memory_mirrored',
    'pipeline_over_in_memory_default', 'pipeline_over_in_memory_mirrored',
    'mirrored_over_default_in_memory', 'mirrored_over_default_live_table',
    'mirrored_over_default_pipeline'}
DEVICE_FACTS = ('tf_version', 'cuda_build', 'cuda_version', 'cudnn_version',
                'gpu_count', 'gpus', 'physical_devices', 'driver_gpus',
                'host_cpus', 'malloc')


def _run(*args, timeout=600):
  return subprocess.run([sys.executable, '-m', 'bench.gpu'] + list(args),
                        cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=timeout, check=False)


def _positive_finite(value) -> bool:
  return isinstance(value, float) and math.isfinite(value) and value > 0


def test_smoke_prints_one_json_document_of_positive_rates():
  out = _run('--smoke')
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout)  # stdout holds the JSON and nothing else.
  device = result['device']
  for key in DEVICE_FACTS:
    assert key in device, key
  assert result['accelerator'] == ('gpu' if device['gpu_count'] else 'cpu')
  assert device['host_cpus'] >= 1
  assert result['settings']['smoke'] is True
  assert result['settings']['env'] == 'MinitaurBulletEnv-v0'
  assert result['settings']['batch_size'] == 16
  assert _positive_finite(result['replay']['fill_items_per_s'])
  for name in STRATEGIES:
    assert result[name]['replicas'] >= 1, name
    assert len(result[name]['devices']) == result[name]['replicas'], name
    for key in RATES:
      assert _positive_finite(result[name][key]), (name, key, result[name])
  ratios = result['ratios']
  assert set(ratios) == RATIOS
  assert all(_positive_finite(r) for r in ratios.values()), ratios
  d = result['default']
  assert ratios['live_over_in_memory_default'] == round(
      d['train_steps_per_s_live_table'] / d['train_steps_per_s_in_memory'], 3)
  assert _positive_finite(result['wall_s'])


def test_a_bad_flag_is_one_line():
  out = _run('--agent=dqn', timeout=120)
  assert out.returncode == 2
  assert out.stdout == ''
  assert out.stderr.strip().splitlines()[-1] == (
      'bench.gpu: error: --agent=dqn: bench.gpu measures the SAC learner; '
      'leave --agent=sac')


def test_a_failed_strategy_leaves_the_others_figures():
  from bench import gpu  # pylint: disable=g-import-not-at-top
  default = {'train_steps_per_s_in_memory': 200.0,
             'train_steps_per_s_live_table': 100.0,
             'pipeline_batches_per_s': 300.0}
  measured = {'default': default,
              'mirrored': {'error': 'InternalError: no kernel'}}
  assert gpu.ratios(measured) == {'live_over_in_memory_default': 0.5,
                                  'pipeline_over_in_memory_default': 1.5}
  assert gpu.failures(measured) == ['mirrored: InternalError: no kernel']
  assert gpu.failures(dict(measured, mirrored=dict(
      default, pipeline_batches_per_s=float('nan')))) == [
          'mirrored pipeline_batches_per_s came out nan']
