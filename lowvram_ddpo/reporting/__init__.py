"""Watching a run: trackers (TensorBoard, wandb), the metrics chart, the time left."""
