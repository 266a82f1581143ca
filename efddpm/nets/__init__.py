"""The SD1.x networks (UNet, KL autoencoder, CLIP text encoder) and the CLIP tokenizer, in plain PyTorch."""
