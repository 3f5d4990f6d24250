"""Training pieces: optimizers, losses, the train and eval steps, FLOP
accounting and the metrics log. The loop that drives them is
jaxkit.run.trainer."""
