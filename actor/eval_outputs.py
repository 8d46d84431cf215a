"""What the evaluator leaves for a person: a returns plot and episode videos.

Both run headless: matplotlib draws with the Agg backend and environments
render to arrays (`env.render()`, as the tutorial's video does).
"""

import os

os.environ.setdefault('SDL_VIDEODRIVER', 'dummy')  # gym's pygame renderers.
os.environ.setdefault('MPLBACKEND', 'Agg')

from typing import List  # pylint: disable=g-import-not-at-top


def plot_returns(rows: List[dict], path: str, title: str) -> None:
  """Draws AverageReturn against train step, as the tutorial plots it."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  steps = [r['train_step'] for r in rows]
  returns = [r['AverageReturn'] for r in rows]
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
  ax.plot(steps, returns, marker='o')
  ax.set_xlabel('Step')
  ax.set_ylabel('Average Return')
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  tmp = path + '.tmp.png'
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, path)  # Never leave a half-written PNG.


def write_video(env, policy, path: str, episodes: int, fps: float) -> int:
  """Renders `episodes` greedy episodes into an mp4, one frame per agent step
  played at `fps` (the control rate: real speed); returns frames written."""
  import imageio  # pylint: disable=g-import-not-at-top
  frames = 0
  tmp = path + '.tmp.mp4'
  with imageio.get_writer(tmp, fps=fps, macro_block_size=1) as video:
    for _ in range(episodes):
      time_step = env.reset()
      video.append_data(env.render())
      frames += 1
      while not time_step.is_last():
        action_step = policy.action(time_step)
        time_step = env.step(action_step.action)
        video.append_data(env.render())
        frames += 1
  os.replace(tmp, path)
  return frames
