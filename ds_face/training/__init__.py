"""The training loop and what it is made of: the Trainer, the LR schedule, evaluation callbacks, --init-backbone."""
