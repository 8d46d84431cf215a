"""`make learn`'s aggregate over seeds: mean and IQM with bootstrap CIs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bench import curves


def _runs(finals):
  """One curve per seed: 0 at step 0, `final` at 10000, linear between."""
  return [[{'train_step': step, 'wall_s': 60.0 * (1 + step // 5000),
            'return_mean': final * step / 10000}
           for step in (0, 5000, 10000)] for final in finals]


def test_aggregate_is_mean_and_iqm_with_intervals_around_them():
  finals = [1.0, 3.0, 3.5, 4.0, 10.0]  # One outlier seed.
  rows = curves.aggregate(_runs(finals), reps=2000)
  assert [r['train_step'] for r in rows] == [0, 5000, 10000]
  last = rows[-1]
  assert last['runs'] == 5 and last['returns'] == finals
  assert last['mean'] == pytest.approx(np.mean(finals))
  # The IQM drops the bottom and top quarter of the seeds: the outlier too.
  assert last['iqm'] == pytest.approx(np.mean([3.0, 3.5, 4.0]))
  assert last['iqm'] < last['mean']
  for name in ('mean', 'iqm'):
    assert last[f'{name}_ci_low'] <= last[name] <= last[f'{name}_ci_high']
    assert last[f'{name}_ci_high'] - last[f'{name}_ci_low'] > 0.5
  assert (last['min'], last['max']) == (1.0, 10.0)
  # All seeds at 0: no spread, no interval.
  assert rows[0]['iqm_ci_low'] == rows[0]['iqm_ci_high'] == 0.0


def test_seeds_evaluated_at_different_steps_are_put_on_every_step():
  runs = _runs([2.0, 4.0])
  del runs[1][1]  # Seed 1 skipped the evaluation at 5000.
  rows = curves.aggregate(runs, reps=500)
  assert [r['train_step'] for r in rows] == [0, 5000, 10000]
  assert rows[1]['returns'] == [1.0, 2.0]  # Halfway between its own.


def test_plot_only_writes_the_aggregate_and_quotes_it(tmp_path):
  """`python -m bench.learning --plot_only` over 3 seeds' curves."""
  for seed, final in enumerate([3.0, 4.0, 5.0]):
    run_dir = tmp_path / 'minitaur' / f'seed_{seed}'
    run_dir.mkdir(parents=True)
    rows = _runs([final])[0] + [{'train_step': s, 'wall_s': 60.0 * s / 5000,
                                 'return_mean': final * s / 10000}
                                for s in (25000, 50000, 100000)]
    with open(run_dir / curves.CURVE, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
  run = subprocess.run(
      [sys.executable, '-m', 'bench.learning', f'--out={tmp_path}',
       '--plot_only'], capture_output=True, text=True, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert run.returncode == 0, run.stderr[-2000:]
  assert 'minitaur at 100k over 3 seeds: IQM 40.00' in run.stdout
  assert (tmp_path / 'aggregate.png').stat().st_size > 10000
  with open(tmp_path / 'minitaur' / curves.AGGREGATE) as f:
    rows = [json.loads(line) for line in f]
  assert rows[-1]['train_step'] == 100000 and rows[-1]['returns'] == [
      30.0, 40.0, 50.0]


def test_a_run_in_parts_counts_only_the_time_it_ran():
  parts = [[100.0, 160.0], [1000.0, None]]  # 60 s, a gap, then running.
  assert curves.run_seconds(130.0, parts) == 30.0
  assert curves.run_seconds(160.0, parts) == 60.0
  assert curves.run_seconds(1010.0, parts) == 70.0
  rows = curves.curve_rows([{'train_step': 5, 'time': 1030.0,
                               'AverageReturn': 1.0,
                               'AverageEpisodeLength': 3.0}], parts)
  assert rows[0]['wall_s'] == 90.0
