"""The actor process: collects experience with the latest weights, or evaluates."""
