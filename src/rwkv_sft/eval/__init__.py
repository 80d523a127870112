"""Evaluation of a model on held-out data (`rwkv-sft eval`, and the trainer's periodic evaluation):
it reads a model and data, never the trainer."""
