"""Rates and ETAs for progress lines."""

import time


def format_duration(seconds: float) -> str:
  if seconds != seconds or seconds == float('inf'):  # NaN or inf
    return '?'
  seconds = int(max(0, seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else (f'{m}m{s:02d}s' if m else f'{s}s')


class RateMeter:
  """Counts progress towards an optional total; reports rate and ETA.

  The rate is over the window since the last `report()`, so it reflects the
  current speed, not the average since start-up (which includes imports).
  """

  def __init__(self, start_count: int = 0, total: int = 0):
    self.total = total
    self._last_count = start_count
    self._last_time = time.monotonic()
    self.rate = 0.0

  def due(self, interval_s: float) -> bool:
    return time.monotonic() - self._last_time >= interval_s

  def update(self, count: int) -> float:
    now = time.monotonic()
    elapsed = now - self._last_time
    if elapsed > 0:
      self.rate = (count - self._last_count) / elapsed
    self._last_count, self._last_time = count, now
    return self.rate

  def eta(self, count: int) -> str:
    if not self.total or self.rate <= 0:
      return '?'
    return format_duration((self.total - count) / self.rate)
