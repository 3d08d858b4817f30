"""The pure core: tokens, batches, the GPT, its optimizers and training step, checkpoints, the device. It imports only
itself, fwray.config and fwray.errors, and runs where torch alone is installed (a GPU machine without Ray or MLflow)."""
