"""SynthMRI: on-demand synthetic brain MRI from a diffusion model."""

__version__ = "0.1.0"
