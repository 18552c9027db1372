"""Ray stages: filter LAION metadata, download with img2dataset, pre-encode VAE latents, train, evaluate.

Each stage is a function taking a config (a mapping, as conf/ YAML gives) and returning a StageResult; the
jobs/ entry points only parse the command line and call it.
"""
