"""Weights in from and out to other codebases' layouts: the original CompVis repository and diffusers."""
