"""The training engine: populations of P members trained as one batched model, one
LightningModule per stage kind, the trainer every stage uses, early stopping, the data
order, optimisers, epoch checkpoints and the observers told each epoch."""
