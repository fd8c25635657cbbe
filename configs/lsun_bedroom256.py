"""DDPM on LSUN bedroom at 256x256 (Ho et al. 2020): the CelebA-HQ 256 model on tfds `lsun/bedroom`.

Prepare `lsun/bedroom` once on a machine with internet and TensorFlow (pip install -e '.[prepare]';
tfds build lsun/bedroom --file_format=array_record); images are centre-cropped and resized to 256.

  python -m ddpm_jax.main --config=configs/lsun_bedroom256.py --workdir=runs/lsun_bedroom256 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from configs import celebahq256


def get_config():
  config = celebahq256.get_config()
  config.data.update(dataset="lsun_bedroom", eval_split="validation")
  config.training.num_train_steps = 2_400_000
  return config
