"""The embedded offline default: scikit-learn's 1,797 handwritten 8x8 digits.

Trains a small U-Net to recognisable samples in minutes on a 2-core CPU:

  python -m ddpm_jax.main --config=configs/digits.py --workdir=runs/digits
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.update(dataset="digits", image_size=8, num_channels=1, random_flip=False,
                     eval_split="test")
  config.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
  config.training.update(batch_size=64, num_train_steps=2_500, ema_decay=0.995, log_every=100,
                         checkpoint_every=500, sample_every=500,
                         final_eval_metrics=("digits_score",))
  config.optim.update(lr=1e-3, warmup_steps=200)
  # DPM-Solver++(2M) SDE at 50 model calls: the best digits score at <= 50 NFE in
  # experiments/results/digits_samplers.md, and better than 1000-step ancestral sampling on FD,
  # mean confidence and IS, at the cost of DDIM-50.
  config.sampling.update(sampler="dpm_solver_pp_sde", num_steps=50, num_samples=500,
                         batch_size=512, trajectory_every=5)
  config.eval.update(metrics=("digits_score", "bpd"), batch_size=360, fid_split="train")
  return config
