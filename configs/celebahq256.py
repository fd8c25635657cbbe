"""DDPM on CelebA-HQ at 256x256 (Ho et al. 2020, appendix B).

ch_mult (1,1,2,2,4,4), attention at 16.

The tfds `celeb_a_hq/256` dataset needs manual preparation: follow tfds' instructions
for celeb_a_hq (download the deltas, place them in the manual dir) and run
`tfds build celeb_a_hq/256 --file_format=array_record` on a machine with TensorFlow
(pip install -e '.[prepare]').

  python -m ddpm_jax.main --config=configs/celebahq256.py --workdir=runs/celebahq256 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.update(dataset="celeb_a_hq", image_size=256, num_channels=3, random_flip=True,
                     eval_split="train")
  config.model.update(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,),
                      dropout=0.0)
  config.training.update(batch_size=64, num_train_steps=500_000)
  config.optim.update(lr=2e-5)
  config.sampling.update(batch_size=64, num_samples=50_000)
  return config
