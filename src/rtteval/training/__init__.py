"""The training loop every stage shares: one loop, the batched lr grid, optimizers, losses."""
