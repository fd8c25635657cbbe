"""Your own images: a folder of PNG/JPEG/WebP (class subfolders give labels), or its packed form.

Point data.data_dir at the folder (local or gs://); images are resized on the short side and
centre-cropped to data.image_size, and converted to data.num_channels (1 or 3):

  python -m ddpm_jax.main --config=configs/folder.py --config.data.data_dir=/path/to/images \
      --workdir=runs/folder

For a pod, pack the folder once (no TensorFlow) and point data_dir at the packed copy; it gives
the same batches without decoding:

  python -m ddpm_jax.pack_folder --src=/path/to/images --out=gs://bucket/packed \
      --image_size=32 --num_channels=3
  python -m ddpm_jax.main --config=configs/folder.py --config.data.data_dir=gs://bucket/packed \
      --workdir=gs://bucket/runs/folder

Class folders map to labels in sorted order; the mapping goes to <workdir>/class_names.json.
The folder has one split ("train"), so evaluation reads the training images too.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.update(dataset="folder", data_dir="", image_size=32, num_channels=3,
                     eval_split="train")
  # A mid-sized U-Net (about 9M parameters) that trains on a single accelerator; use the
  # CIFAR-10 settings of configs/cifar10.py (ch=128, ch_mult=(1, 2, 2, 2)) for large folders.
  config.model.update(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                      dropout=0.1)
  config.training.update(num_train_steps=100_000, ema_decay=0.9995, sample_every=5_000)
  config.eval.update(metrics=("bpd",), fid_split="train")
  return config
