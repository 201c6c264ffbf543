"""The latent space of stage 2: the frozen first stage, its scale factor, and the latent cache."""
