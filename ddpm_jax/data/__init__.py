"""Where training and evaluation data come from: the tfds / digits / image-folder sources, the
topology-free global batch order (`global_order`), the grain pipeline (`input_pipeline`) and the
one-time folder packer. Imports nothing of ddpm_jax outside this package.
"""
