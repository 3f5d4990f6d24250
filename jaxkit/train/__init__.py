"""Training: optimizers, steps, the loop (jaxkit.train.trainer), FLOP accounting."""
