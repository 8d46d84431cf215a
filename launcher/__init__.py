"""The one-command local cluster: server, learner, actors and evaluator as OS processes."""
