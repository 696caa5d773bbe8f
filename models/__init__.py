"""Plain ``nn.Module``s (corruption, the DAE layer, the deep classifier) and the
LightningModules that train them."""
