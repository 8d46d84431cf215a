"""Learning benchmark: the real cluster to --train_steps, per preset and seed.

Each run is the launcher (replay server, learner, actors, evaluator as
separate processes) with `--preset=<preset> --seed=<seed>`. Its evaluator rows
become `<out>/<preset>/seed_<seed>/curve.jsonl`: train_step, env_steps,
wall-clock seconds since the launcher started, greedy return mean and std over
the evaluation episodes, episode length. `--baseline` adds the tutorial's
single-process loop (bench/tutorial_loop.py) for the same steps. All curves
are drawn into `<out>/learning.png`: return against train steps and against
wall-clock, mean over seeds with the spread between seeds shaded (one seed:
the spread between evaluation episodes). A series of 2 or more seeds also
gets `<out>/<series>/aggregate.jsonl` and `<out>/aggregate.png`: at every
evaluation step the mean and the interquartile mean over seeds, each with its
95 % stratified-bootstrap confidence interval (rliable), and the quoted
figures at 25k/50k/100k train steps on stdout.

A run whose curve.jsonl already reaches --train_steps is kept, not rerun
(--rerun to force), so presets can be run one at a time and drawn together.

  make learn                                   # minitaur preset, 3 seeds, 100k
  make learn ARGS=--seeds=5                    # seeds 0-4
  make learn ARGS="--presets=minitaur,tutorial --baseline --seeds=2"
  python -m bench.learning --plot_only --out=bench/results/learning/minitaur
"""

import json
import os
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OUT = flags.DEFINE_string('out', 'runs/learning', 'Output directory.')
PRESETS = flags.DEFINE_list('presets', ['minitaur'],
                            'Presets to run (presets/<name>.cfg).')
SEEDS = flags.DEFINE_integer('seeds', 1, 'Seeds per preset: 0..seeds-1.',
                             lower_bound=1)
FIRST_SEED = flags.DEFINE_integer('first_seed', 0, 'First seed.',
                                  lower_bound=0)
TRAIN_STEPS = flags.DEFINE_integer('train_steps', 100000, 'Train steps.',
                                   lower_bound=1)
BASELINE = flags.DEFINE_boolean(
    'baseline', False, "Also run the tutorial's single-process loop.")
ENV = flags.DEFINE_string('env', 'MinitaurBulletEnv-v0', 'Environment.')
EVAL_INTERVAL = flags.DEFINE_integer(
    'eval_interval', None, 'Train steps between evaluations (every run; '
    "default: the preset's).", lower_bound=1)
NUM_EVAL_EPISODES = flags.DEFINE_integer(
    'num_eval_episodes', None, 'Greedy episodes per evaluation (every run; '
    "default: the preset's).", lower_bound=1)
FINAL_EVAL_EPISODES = flags.DEFINE_integer(
    'final_eval_episodes', None, 'Greedy episodes of the final evaluation '
    "(every run; default: the preset's).", lower_bound=1)
RERUN = flags.DEFINE_boolean('rerun', False,
                             'Rerun runs whose curve is already complete.')
RESUME = flags.DEFINE_boolean(
    'resume', False,
    'Continue an incomplete run (or a complete one, to a larger '
    '--train_steps) from its checkpoints instead of starting it afresh; its '
    'wall-clock leaves out the time between the parts.')
PLOT_ONLY = flags.DEFINE_boolean('plot_only', False,
                                 'Only redraw the figure from the curves.')
IMPORT_RUNS = flags.DEFINE_list(
    'import_runs', [],
    'name:root_dir pairs of finished launcher runs to add as series (seed 0 '
    'of <name>); their wall-clock counts from the first evaluation.')
VARIANTS = flags.DEFINE_multi_string(
    'variant', [],
    'name:flags: a series run with --presets\' first preset plus these '
    'space-separated launcher flags, e.g. --variant="prioritized:'
    '--replay=prioritized". Given, it replaces the one-series-per-preset '
    'runs.')
THRESHOLD = flags.DEFINE_float(
    'threshold', None,
    'Also report, per run, the first train step whose greedy return is at or '
    'above this (steps-to-threshold).')
EXTRA = flags.DEFINE_list(
    'launcher_flags', [],
    'More flags for every launcher run, e.g. --launcher_flags=--num_actors=2')

BASELINE_NAME = 'tutorial_loop'
CURVE = 'curve.jsonl'
PARTS = 'parts.json'  # [started, ended] of each launcher invocation.


def read_jsonl(path):
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.endswith('\n'):
          rows.append(json.loads(line))
  return rows


def complete(run_dir, train_steps):
  rows = read_jsonl(os.path.join(run_dir, CURVE))
  return bool(rows) and rows[-1]['train_step'] >= train_steps


def run_seconds(t, parts):
  """Seconds of running at wall time `t` of a run made in `parts`
  ([started, ended or None] of each launcher invocation): the gaps between
  parts do not count."""
  total = 0.0
  for started, ended in parts:
    if t < started:
      break
    if ended is None or t <= ended:
      return total + t - started
    total += ended - started
  return total


def curve_rows(metrics_rows, started):
  """Evaluator rows of this run -> curve rows; `started` is the launch time
  or the run's parts (`run_seconds`)."""
  parts = started if isinstance(started, list) else [[started, None]]
  out = []
  for r in metrics_rows:
    out.append({
        'train_step': r['train_step'],
        'env_steps': r.get('env_steps'),
        'wall_s': round(run_seconds(r['time'], parts), 1),
        'return_mean': r['AverageReturn'],
        'return_std': r.get('ReturnStd'),
        'episode_length': r['AverageEpisodeLength'],
        'num_episodes': r.get('num_episodes'),
    })
  return out


def _stream(proc, label):
  """Echoes the child's progress lines, prefixed; returns its exit code."""
  for line in proc.stdout:
    if line.startswith('[launcher]') or 'tutorial_loop:' in line or (
        'error' in line.lower()):
      text = line.split('] ', 1)[-1] if 'tutorial_loop:' in line else line
      sys.stdout.write(f'[{label}] {text.rstrip()}\n')
      sys.stdout.flush()
  return proc.wait()


def variants():
  """{name: launcher flags} of the --variant series."""
  out = {}
  for spec in VARIANTS.value:
    name, _, extra = spec.partition(':')
    out[name] = extra.split()
  return out


def run_cluster(preset, seed, run_dir, eval_flags, extra=()):
  root = os.path.join(run_dir, 'run')
  parts_path = os.path.join(run_dir, PARTS)
  parts = []
  if RESUME.value and os.path.exists(root):
    if not os.path.exists(parts_path):
      raise SystemExit(f'[learning] --resume: {root} has no {PARTS} (when '
                       'its parts ran); not resuming it')
    with open(parts_path) as f:
      parts = json.load(f)  # Resumed on the same root_dir: its checkpoints.
    print(f'[learning] {preset} seed {seed}: resuming {root} (part '
          f'{len(parts) + 1})', flush=True)
  elif os.path.exists(root):
    shutil.rmtree(root)  # A fresh run: no resumed replay or checkpoints.
  args = [sys.executable, '-m', 'launcher', f'--preset={preset}',
          f'--seed={seed}', f'--env={ENV.value}',
          f'--train_steps={TRAIN_STEPS.value}', f'--root_dir={root}',
          '--show_child_logs=false', '--progress_interval_s=30'
         ] + eval_flags + EXTRA.value + list(extra)
  parts.append([time.time(), None])
  proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED='1'))
  try:
    code = _stream(proc, f'{preset} seed {seed}')
  finally:
    parts[-1][1] = time.time()
    with open(parts_path, 'w') as f:
      json.dump(parts, f)
  rows = curve_rows(read_jsonl(os.path.join(root, 'eval', 'metrics.jsonl')),
                    parts)
  with open(os.path.join(run_dir, CURVE), 'w') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')
  return code


def run_baseline(seed, run_dir, eval_flags):
  # The tutorial's loop has one kind of evaluation.
  eval_flags = [f for f in eval_flags
                if not f.startswith('--final_eval_episodes=')]
  args = [sys.executable, '-m', 'bench.tutorial_loop', f'--out={run_dir}',
          f'--env={ENV.value}', f'--seed={seed}',
          f'--train_steps={TRAIN_STEPS.value}'] + eval_flags
  proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED='1'))
  return _stream(proc, f'{BASELINE_NAME} seed {seed}')


def load_series(out):
  """{name: [rows of each seed]} for every run under `out`."""
  series = {}
  for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
    path = os.path.join(out, name)
    if not os.path.isdir(path):
      continue
    runs = [read_jsonl(os.path.join(path, d, CURVE))
            for d in sorted(os.listdir(path)) if d.startswith('seed_')]
    runs = [r for r in runs if r]
    if runs:
      series[name] = runs
  return series


def summarize(series):
  """Lines of text: each series' return at a few steps, and its wall-clock."""
  lines = []
  for name, runs in series.items():
    for i, rows in enumerate(runs):
      final = rows[-1]
      lines.append(
          f'{name} run {i}: ' + ', '.join(
              f'{r["train_step"] // 1000}k {r["return_mean"]:.2f}'
              for r in rows) +
          f' | final {final["return_mean"]:.2f} at {final["train_step"]} '
          f'train steps, {final["wall_s"] / 60:.1f} min')
  return lines


def steps_to_threshold(series, threshold):
  """Lines of text: per series, the first step at/above `threshold` per seed."""
  import statistics  # pylint: disable=g-import-not-at-top
  lines = []
  for name, runs in series.items():
    firsts = [next((r['train_step'] for r in rows
                    if r['return_mean'] >= threshold), None) for rows in runs]
    reached = [f for f in firsts if f is not None]
    median = (f'median {statistics.median(reached):.0f}'
              if len(reached) == len(firsts) else
              f'{len(reached)}/{len(firsts)} seeds reached it')
    finals = [rows[-1]['return_mean'] for rows in runs]
    lines.append(f'{name}: steps to {threshold:g}: '
                 f'{["never" if f is None else f for f in firsts]} ({median}); '
                 f'final returns {[round(f, 1) for f in finals]} (mean '
                 f'{sum(finals) / len(finals):.1f})')
  return lines


# Train steps the README quotes the aggregate at.
QUOTED_STEPS = (25000, 50000, 100000)
AGGREGATE = 'aggregate.jsonl'


def on_common_steps(runs):
  """(steps, returns [run, step], wall-clock minutes [run, step]) of `runs`
  on the union of their evaluation steps up to the shortest run's last.

  Seeds are evaluated at different steps (the evaluator skips an interval it
  cannot keep up with): each run is put on every step, linearly between its
  own evaluations, so each final counts.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  last = min(rows[-1]['train_step'] for rows in runs)
  steps = np.array(sorted({r['train_step'] for rows in runs for r in rows
                           if r['train_step'] <= last}))

  def at_steps(rows, key):
    return np.interp(steps, [r['train_step'] for r in rows],
                     [r[key] for r in rows])

  returns = np.array([at_steps(rows, 'return_mean') for rows in runs])
  walls = np.array([at_steps(rows, 'wall_s') for rows in runs]) / 60
  return steps, returns, walls


def aggregate(runs, reps=5000):
  """Rows, one per evaluation step: mean and interquartile mean (IQM) over
  the runs' greedy returns, each with its 95 % stratified-bootstrap
  confidence interval (rliable: Agarwal et al. 2021), and the spread.

  One task, so the IQM is the mean of the middle 50 % of runs (with 5 runs,
  of the middle 3 after dropping 1/4 of the mass from each end).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from rliable import library as rly  # pylint: disable=g-import-not-at-top
  from rliable import metrics  # pylint: disable=g-import-not-at-top
  steps, returns, walls = on_common_steps(runs)
  scores = {'x': returns[:, None, :]}  # [runs, tasks=1, steps]

  def per_step(metric):
    return lambda x: np.array([metric(x[..., i]) for i in range(x.shape[-1])])

  import warnings  # pylint: disable=g-import-not-at-top
  # rliable hands arch a RandomState, which arch calls deprecated.
  warnings.filterwarnings('ignore', 'random_state is deprecated',
                          FutureWarning)
  estimates = {}
  for name, metric in (('mean', metrics.aggregate_mean),
                       ('iqm', metrics.aggregate_iqm)):
    point, interval = rly.get_interval_estimates(
        scores, per_step(metric), reps=reps,
        random_state=np.random.RandomState(0))
    estimates[name] = (point['x'], interval['x'])
  rows = []
  for i, step in enumerate(steps):
    row = {'train_step': int(step), 'runs': len(runs),
           'wall_min_mean': round(float(walls[:, i].mean()), 2)}
    for name, (point, interval) in estimates.items():
      row[name] = round(float(point[i]), 4)
      row[f'{name}_ci_low'] = round(float(interval[0, i]), 4)
      row[f'{name}_ci_high'] = round(float(interval[1, i]), 4)
    row['min'] = round(float(returns[:, i].min()), 4)
    row['max'] = round(float(returns[:, i].max()), 4)
    row['returns'] = [round(float(v), 4) for v in returns[:, i]]
    rows.append(row)
  return rows


def write_aggregates(series, out):
  """`<out>/<name>/aggregate.jsonl` of every series with 2 or more runs;
  {name: rows}."""
  done = {}
  for name, runs in series.items():
    if len(runs) < 2:
      continue
    rows = aggregate(runs)
    with open(os.path.join(out, name, AGGREGATE), 'w') as f:
      for r in rows:
        f.write(json.dumps(r) + '\n')
    done[name] = rows
  return done


def quote(name, rows, steps=QUOTED_STEPS):
  """Lines of text: the aggregate at the quoted steps."""
  lines = []
  by_step = {r['train_step']: r for r in rows}
  for step in steps:
    r = by_step.get(step)
    if r is None:
      continue
    lines.append(
        f'{name} at {step // 1000}k over {r["runs"]} seeds: IQM '
        f'{r["iqm"]:.2f} [{r["iqm_ci_low"]:.2f}, {r["iqm_ci_high"]:.2f}], '
        f'mean {r["mean"]:.2f} [{r["mean_ci_low"]:.2f}, '
        f'{r["mean_ci_high"]:.2f}] (95 % bootstrap CIs), seeds '
        f'{r["min"]:.2f} to {r["max"]:.2f}: '
        + ', '.join(f'{v:.2f}' for v in r['returns'])
        + f'; {r["wall_min_mean"]:.1f} min')
  return lines


def _figure():
  """(figure, [axes against train steps, axes against wall-clock])."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt.subplots(1, 2, figsize=(12, 4.5))


def _finish_figure(fig, axes, path, title):
  """Labels, legend and title; saved to `path`."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  axes[0].set_xlabel('train steps (thousands)')
  axes[1].set_xlabel('wall-clock (minutes, this machine)')
  for ax in axes:
    ax.set_ylabel('greedy return')
    ax.axhline(0, color='grey', linewidth=0.5)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8, loc='upper left')
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_aggregate(series, aggregates, path, title):
  """IQM with its 95 % CI shaded, the mean dashed and every seed thin,
  against train steps and against wall-clock."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  fig, axes = _figure()
  for name, rows in aggregates.items():
    steps, returns, walls = on_common_steps(series[name])
    iqm = np.array([r['iqm'] for r in rows])
    low = np.array([r['iqm_ci_low'] for r in rows])
    high = np.array([r['iqm_ci_high'] for r in rows])
    mean = np.array([r['mean'] for r in rows])
    for ax, x, seeds_x in ((axes[0], steps / 1000, [steps / 1000] * len(walls)),
                           (axes[1], walls.mean(0), list(walls))):
      line, = ax.plot(x, iqm, marker='o', markersize=3,
                      label=f'{name}: IQM over {len(returns)} seeds, 95 % CI')
      ax.fill_between(x, low, high, alpha=0.25, color=line.get_color())
      ax.plot(x, mean, linestyle='--', color=line.get_color(), linewidth=1,
              label=f'{name}: mean')
      for sx, sy in zip(seeds_x, returns):
        ax.plot(sx, sy, color=line.get_color(), linewidth=0.5, alpha=0.4)
  _finish_figure(fig, axes, path, title)


def plot(series, path, title):
  import numpy as np  # pylint: disable=g-import-not-at-top
  fig, axes = _figure()
  for name, runs in series.items():
    steps, returns, walls = on_common_steps(runs)
    mean = returns.mean(0)
    if len(runs) > 1:
      low, high = returns.min(0), returns.max(0)
      spread = f'{len(runs)} seeds, mean, min-max shaded'
    else:
      std = np.interp(steps, [r['train_step'] for r in runs[0]],
                      [r.get('return_std') or 0.0 for r in runs[0]])
      low, high = mean - std, mean + std
      spread = '1 seed, +-1 std over episodes shaded'
    label = f'{name} ({spread})'
    for ax, x in ((axes[0], steps / 1000), (axes[1], walls.mean(0))):
      line, = ax.plot(x, mean, marker='o', markersize=3, label=label)
      ax.fill_between(x, low, high, alpha=0.2, color=line.get_color())
  _finish_figure(fig, axes, path, title)


def main(argv):
  del argv
  out = os.path.abspath(OUT.value)
  os.makedirs(out, exist_ok=True)
  codes = []
  if not PLOT_ONLY.value:
    # Given, every run is evaluated alike, whatever its preset says.
    eval_flags = [f'--{f.name}={f.value}' for f in (
        EVAL_INTERVAL, NUM_EVAL_EPISODES, FINAL_EVAL_EPISODES)
                  if f.value is not None]
    seeds = range(FIRST_SEED.value, FIRST_SEED.value + SEEDS.value)
    named = variants()
    if named:
      jobs = [(v, s) for v in named for s in seeds]
    else:
      jobs = [(p, s) for p in PRESETS.value for s in seeds]
    if BASELINE.value:
      jobs += [(BASELINE_NAME, s) for s in seeds]
    for i, (name, seed) in enumerate(jobs):
      run_dir = os.path.join(out, name, f'seed_{seed}')
      os.makedirs(run_dir, exist_ok=True)
      if complete(run_dir, TRAIN_STEPS.value) and not RERUN.value:
        print(f'[learning] {name} seed {seed}: complete, kept ({run_dir})')
        continue
      print(f'[learning] run {i + 1}/{len(jobs)}: {name} seed {seed} to '
            f'{TRAIN_STEPS.value} train steps -> {run_dir}', flush=True)
      if name == BASELINE_NAME:
        code = run_baseline(seed, run_dir, eval_flags)
      elif named:
        code = run_cluster(PRESETS.value[0], seed, run_dir, eval_flags,
                           named[name])
      else:
        code = run_cluster(name, seed, run_dir, eval_flags)
      codes.append(code)
      if code != 0:
        print(f'[learning] {name} seed {seed} exited {code}', flush=True)
  for spec in IMPORT_RUNS.value:
    name, _, root = spec.partition(':')
    rows = read_jsonl(os.path.join(root, 'eval', 'metrics.jsonl'))
    if not rows:
      print(f'[learning] --import_runs: no evaluations under {root}')
      return 2
    run_dir = os.path.join(out, name, 'seed_0')
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, CURVE), 'w') as f:
      for r in curve_rows(rows, rows[0]['time'] - rows[0]['eval_seconds']):
        f.write(json.dumps(r) + '\n')
  series = load_series(out)
  if series:
    png = os.path.join(out, 'learning.png')
    plot(series, png, f'{ENV.value}: greedy return (this machine)')
    for line in summarize(series):
      print(f'[learning] {line}')
    if THRESHOLD.value is not None:
      for line in steps_to_threshold(series, THRESHOLD.value):
        print(f'[learning] {line}')
    print(f'[learning] figure: {png}')
    aggregates = write_aggregates(series, out)
    if aggregates:
      png = os.path.join(out, 'aggregate.png')
      plot_aggregate(series, aggregates, png,
                     f'{ENV.value}: greedy return over seeds (this machine)')
      for name, rows in aggregates.items():
        for line in quote(name, rows):
          print(f'[learning] {line}')
      print(f'[learning] aggregate figure: {png} (rows: '
            f'<out>/<series>/{AGGREGATE})')
  return 1 if any(codes) else 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
