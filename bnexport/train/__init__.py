"""Training: the loop and its checkpoints (``loop``), and what is recorded along the way (``recording``)."""
