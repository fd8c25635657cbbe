"""DDPM on LSUN church at 256x256 (Ho et al. 2020).

The CelebA-HQ 256 model on tfds `lsun/church_outdoor`.

Prepare `lsun/church_outdoor` once on a machine with internet and TensorFlow
(pip install -e '.[prepare]'; tfds build lsun/church_outdoor --file_format=array_record); images
are centre-cropped and resized to 256.

  python -m ddpm_jax.main --config=configs/lsun_church256.py --workdir=runs/lsun_church256 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from configs import celebahq256


def get_config():
  config = celebahq256.get_config()
  config.data.update(dataset="lsun_church", eval_split="validation")
  config.training.num_train_steps = 1_200_000
  return config
