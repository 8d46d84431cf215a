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

from bench import curves
from bench.curves import CURVE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OUT = flags.DEFINE_string('out', 'runs/learning', 'Output directory.')
PRESETS = flags.DEFINE_list('presets', ['minitaur'],
                            'Presets to run (presets/<name>.cfg).')
SEEDS = flags.DEFINE_integer(
    'seeds', 3, 'Seeds per preset: first_seed..first_seed+seeds-1.',
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
PARTS = 'parts.json'  # [started, ended] of each launcher invocation.


def complete(run_dir, train_steps):
  rows = curves.read_jsonl(os.path.join(run_dir, CURVE))
  return bool(rows) and rows[-1]['train_step'] >= train_steps


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
  rows = curves.curve_rows(
      curves.read_jsonl(os.path.join(root, 'eval', 'metrics.jsonl')), parts)
  with open(os.path.join(run_dir, CURVE), 'w') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')
  # The final greedy episode beside the curve (run/ is not kept in git).
  video = os.path.join(root, 'eval', f'step_{TRAIN_STEPS.value:08d}.mp4')
  if os.path.exists(video):
    shutil.copy(video, run_dir)
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
    rows = curves.read_jsonl(os.path.join(root, 'eval', 'metrics.jsonl'))
    if not rows:
      print(f'[learning] --import_runs: no evaluations under {root}')
      return 2
    run_dir = os.path.join(out, name, 'seed_0')
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, CURVE), 'w') as f:
      started = rows[0]['time'] - rows[0]['eval_seconds']
      for r in curves.curve_rows(rows, [[started, None]]):
        f.write(json.dumps(r) + '\n')
  series = curves.load_series(out)
  if series:
    png = os.path.join(out, 'learning.png')
    curves.plot(series, png, f'{ENV.value}: greedy return (this machine)')
    for line in curves.summarize(series):
      print(f'[learning] {line}')
    if THRESHOLD.value is not None:
      for line in curves.steps_to_threshold(series, THRESHOLD.value):
        print(f'[learning] {line}')
    print(f'[learning] figure: {png}')
    aggregates = curves.write_aggregates(series, out)
    if aggregates:
      png = os.path.join(out, 'aggregate.png')
      curves.plot_aggregate(series, aggregates, png,
                     f'{ENV.value}: greedy return over seeds (this machine)')
      for name, rows in aggregates.items():
        for line in curves.quote(name, rows):
          print(f'[learning] {line}')
      print(f'[learning] aggregate figure: {png} (rows: '
            f'<out>/<series>/{curves.AGGREGATE})')
  return 1 if any(codes) else 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
