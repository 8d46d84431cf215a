"""The one derivation of every random seed from the run's `--seed`.

Each consumer names itself by a path (role, actor index, environment index);
the same (run seed, path) gives the same seed on every rerun, and different
paths give unrelated streams (an actor's sampling never mirrors the
evaluator's, two environments of one actor never share episodes).
"""

import zlib

_MODULUS = 2**31 - 1  # Fits every seed argument: NumPy, TF, gym, PyBullet.


def derive(run_seed: int, *path) -> int:
  """The seed for `path` (e.g. 'actor', task, 'env', i) in run `run_seed`."""
  name = '/'.join(str(p) for p in path)
  return (run_seed * 1000003 + zlib.crc32(name.encode())) % _MODULUS
