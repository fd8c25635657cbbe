"""DDPM on LSUN cat at 256x256 (Ho et al. 2020): the CelebA-HQ 256 model on tfds `lsun/cat`.

Mostly for the published model (google/ddpm-ema-cat-256, or the TF1 checkpoint at step 1761000):
LSUN's object categories have a train split only, so FID is against the train split. Prepare
`lsun/cat` once on a machine with internet and TensorFlow (pip install -e '.[prepare]'; tfds build
lsun/cat --file_format=array_record).

  python -m ddpm_jax.import_checkpoint --src=google/ddpm-ema-cat-256 --workdir=runs/ddpm_ema_cat \
      --config=configs/lsun_cat256.py
"""

from configs import celebahq256


def get_config():
  config = celebahq256.get_config()
  config.data.update(dataset="lsun_cat", eval_split="train")
  config.training.num_train_steps = 1_800_000
  return config
