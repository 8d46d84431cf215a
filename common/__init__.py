"""Code shared by every process: environments, the SAC agent, specs, Reverb plumbing.

Nothing in here imports a process package (actor/, learner/, ...): this is
*what* is computed; the process packages decide *where* it runs.
"""


def _quiet_gym_notice() -> None:
  """Keeps gym's import-time notice out of every process's stderr.

  gym 0.23 (the version TF-Agents 0.19 is pinned to) prints a multi-line
  "Gym has been unmaintained since 2022 ..." notice from the `gym_notices`
  package on import: nothing a user of this project can act on, once per
  process. Emptying the notices before gym is imported keeps the logs to what
  the project says. Every binary imports `common` before TF-Agents (hence
  gym); a process that imported gym first has printed it already.
  """
  import sys  # pylint: disable=g-import-not-at-top
  if 'gym' in sys.modules:
    return
  try:
    from gym_notices import notices  # pylint: disable=g-import-not-at-top
  except Exception:  # pylint: disable=broad-except
    return  # No notices installed: nothing to keep quiet.
  notices.notices.clear()


_quiet_gym_notice()
