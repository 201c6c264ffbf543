"""Conditioning of stage 2: the embedders tau_theta(y) that turn labels and captions into UNet inputs."""
