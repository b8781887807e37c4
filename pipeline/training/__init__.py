"""Strategies, checkpoints, callbacks, results and launch: the Trainer side of a run."""
