"""Learning curves: reading them, aggregating seeds, drawing them.

A curve is a run's `curve.jsonl` (one row per evaluation: train_step,
env_steps, wall_s, return_mean, return_std, episode_length, num_episodes);
a series is the runs (seeds) of one setting, `<out>/<series>/seed_<N>/`.
`aggregate` gives, at every evaluation step, the mean and the interquartile
mean over seeds with 95 % stratified-bootstrap confidence intervals
(rliable). No flags: `bench.learning` is the command line.
"""

import json
import os

CURVE = 'curve.jsonl'
AGGREGATE = 'aggregate.jsonl'
# Train steps the README quotes the aggregate at.
QUOTED_STEPS = (25000, 50000, 100000)


def read_jsonl(path):
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.endswith('\n'):
          rows.append(json.loads(line))
  return rows


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


def curve_rows(metrics_rows, parts):
  """Evaluator rows of this run -> curve rows; `parts` as `run_seconds`
  takes them."""
  out = []
  seen = set()
  for r in metrics_rows:
    if r['train_step'] in seen:
      continue  # An evaluator resumed before it skipped its last step.
    seen.add(r['train_step'])
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
  from absl import logging  # pylint: disable=g-import-not-at-top
  estimates = {}
  verbosity = logging.get_verbosity()
  # rliable logs 'Calculating estimates for x ...' at INFO on each call.
  logging.set_verbosity(logging.WARNING)
  try:
    for name, metric in (('mean', metrics.aggregate_mean),
                         ('iqm', metrics.aggregate_iqm)):
      with warnings.catch_warnings():
        # rliable hands arch a RandomState, which arch calls deprecated.
        warnings.filterwarnings('ignore', 'random_state is deprecated',
                                FutureWarning)
        point, interval = rly.get_interval_estimates(
            scores, per_step(metric), reps=reps,
            random_state=np.random.RandomState(0))
      estimates[name] = (point['x'], interval['x'])
  finally:
    logging.set_verbosity(verbosity)
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
