"""Code shared by every process: environments, the SAC agent, specs, Reverb plumbing.

Nothing in here imports a process package (actor/, learner/, ...): this is
*what* is computed; the process packages decide *where* it runs.
"""
