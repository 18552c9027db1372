"""Ray stages: filter LAION metadata, download with img2dataset, pre-encode VAE latents, train, evaluate.

Each stage is a function taking its config (a dataclass, pipelines.config; or a mapping, as conf/ YAML gives,
checked into one) and returning a StageResult; the jobs/ entry points only parse the command line and call it.
"""
