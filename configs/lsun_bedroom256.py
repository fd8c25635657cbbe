"""DDPM on LSUN bedroom at 256x256 (Ho et al. 2020, appendix B): ch_mult (1,1,2,2,4,4), attention at 16.

Prepare tfds `lsun/bedroom` once on a machine with internet and TensorFlow
(pip install -e '.[prepare]'; tfds build lsun/bedroom); images are centre-cropped and
resized to 256.

  python -m ddpm_jax.main --config=configs/lsun_bedroom256.py --workdir=runs/lsun_bedroom256 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.update(dataset="lsun_bedroom", image_size=256, num_channels=3, random_flip=True,
                     eval_split="validation")
  config.model.update(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,),
                      dropout=0.0)
  config.training.update(batch_size=64, num_train_steps=2_400_000)
  config.optim.update(lr=2e-5)
  config.sampling.update(batch_size=64, num_samples=50_000)
  return config
