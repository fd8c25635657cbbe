"""A noise-conditional digits classifier p(c | x_t, t) for classifier guidance.

Dhariwal & Nichol (2021) train the classifier on x_t ~ q(x_t | x_0) at uniformly drawn t, with
the encoder half of the denoiser's U-Net and a pooled head; here it is the digits U-Net's
encoder (configs/digits.py), trained with cross-entropy by the project's own trainer. Train it,
then guide an unconditional (or conditional) digits model toward a class with it:

  python -m ddpm_jax.main --config=configs/digits_classifier_noisy.py \\
      --workdir=runs/digits_classifier_noisy
  python -m ddpm_jax.main --config=configs/digits.py --workdir=runs/digits --mode=sample \\
      --config.sampling.classifier_workdir=runs/digits_classifier_noisy \\
      --config.sampling.classifier_scale=1.0 --config.sampling.class_label=3
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.training.objective = "classifier"
  config.model.num_classes = 10  # the classifier's logits
  config.training.update(num_train_steps=1_500, final_eval_metrics=(), ema_decay=0.99)
  return config
