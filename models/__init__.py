"""Plain ``nn.Module``s and their equations: corruption, the encoder layer, the denoising
autoencoder, the deep classifier, the deep autoencoder and the registered models' raw-input
wrappers. What trains them is ``training``."""
