"""The learner process: trains SAC from the replay table, pushes weights."""
