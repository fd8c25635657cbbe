"""Every default of an experiment, grouped by the module that reads it.

Variant configs import `get_config` from here and edit a few fields, so that
`--config.a.b=value` overrides and the "differs from base" log line stay short.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict(dict(
      dataset="cifar10",        # see ddpm_jax.data.input_pipeline.DATASETS
      image_size=32,
      num_channels=3,
      random_flip=True,         # per-image horizontal flips (DDPM CIFAR-10 setting)
      data_dir="",              # tfds data_dir ("" = ~/tensorflow_datasets);
                                # the image folder for dataset "folder"
      train_split="train",
      eval_split="test",
      label_key="label",        # record feature with the class (int); "" = unlabelled batches
      skip_corrupt=False,       # folder source: skip unreadable images (with a count) or fail
      num_workers=0,            # grain worker processes; 0 reads in the main process
      prefetch_batches=2,
  ))

  config.model = ml_collections.ConfigDict(dict(
      name="unet",              # the noise predictor: unet (DDPM's U-Net) | dit (Peebles & Xie
                                # 2023; docs/dit.md). The U-Net reads ch .. num_groups, the DiT
                                # patch_size .. norm_eps; both read dtype and num_classes.
      ch=128,
      ch_mult=(1, 2, 2, 2),
      num_res_blocks=2,
      attn_resolutions=(16,),
      dropout=0.1,
      resamp_with_conv=True,
      num_groups=32,            # GroupNorm groups (DDPM's 32); must divide every channel count
                                # the U-Net normalises: ch x each ch_mult and the skip
                                # concatenations (validation lists the valid choices)
      patch_size=2,             # dit: p x p pixels per token
      hidden_size=384,          # dit: token width d (DiT-S: 384, B: 768, L: 1024, XL: 1152)
      depth=12,                 # dit: transformer blocks
      num_heads=6,              # dit: attention heads (d / heads per head)
      mlp_ratio=4.0,            # dit: MLP hidden width / d
      norm_eps=1e-6,            # dit: epsilon of the LayerNorm before each MLP (diffusers: 1e-5)
      dtype="float32",          # compute dtype: float32 | bfloat16 (params stay float32)
      num_classes=0,            # 0 = unconditional; K = class-conditional on labels 0..K-1
      sr_factor=0,              # f > 0: a super-resolution stage (SR3 / cascade) that also takes
                                # the x f bilinearly upsampled (H/f)x(W/f) image (README
                                # "Restoration and super-resolution")
  ))

  config.diffusion = ml_collections.ConfigDict(dict(
      schedule="linear",        # see ddpm_jax.core.schedules.SCHEDULES
      num_timesteps=1000,
      zero_terminal_snr=False,  # Lin et al. 2023 rescaling of any schedule
      model_output="eps",       # eps | x0 | v
      model_var="fixed_large",  # fixed_small | fixed_large | learned | learned_range
      loss="mse",               # mse | kl | hybrid
      hybrid_lambda=0.001,
      weighting="none",         # none | p2 | min_snr
      p2_k=1.0,
      p2_gamma=1.0,
      min_snr_gamma=5.0,
      t_sampling="uniform",     # uniform | importance
      clip_x0=True,
      # What the network is and how it is trained (README "Objectives"):
      # ddpm: the discrete VP model of model_output (eps | x0 | v) on `schedule`;
      # edm: EDM's preconditioned denoiser (Karras et al. 2022), log-normal sigma;
      # flow: flow matching / rectified flow, x_t = (1 - t) x_0 + t eps, velocity target.
      # edm and flow are sampled on an EDM sigma ladder [sigma_min, sigma_max] of num_timesteps
      # levels (schedule, model_output, loss and weighting are then DDPM's only).
      parameterization="ddpm",
      sigma_data=0.5,           # edm: the data's standard deviation in c_skip, c_out, c_in
      p_mean=-1.2,              # edm: log sigma ~ N(p_mean, p_std^2) in training
      p_std=1.2,
      sigma_min=0.002,          # edm, flow: the sampling ladder's ends (EDM's)
      sigma_max=80.0,
      flow_t="uniform",         # flow: t ~ uniform | logit_normal (Esser et al. 2024)
      flow_t_mean=0.0,          # flow, logit_normal: t = sigmoid(N(mean, std^2))
      flow_t_std=1.0,
  ))

  config.training = ml_collections.ConfigDict(dict(
      batch_size=128,           # global, over all processes and devices
      num_train_steps=800_000,
      seed=0,
      ema_decay=0.9999,
      log_every=100,
      checkpoint_every=5_000,
      keep_checkpoints=3,
      sample_every=20_000,
      num_grid_samples=64,
      grid_sampler_steps=100,   # DDIM steps for the periodic sample grids
      final_eval_metrics=(),    # eval.metrics entries to run once training ends
      skip_nonfinite_updates=False,  # drop a non-finite update and go on, instead of stopping
      shard_state=False,        # FSDP / ZeRO-3: each device keeps 1/N of the params, EMA and Adam
                                # moments, gathered for each step (docs/pods.md#sharded-state)
      allow_config_change=False,     # resume despite a changed diffusion process
      p_uncond=0.1,             # class-conditional models: label dropped to the null class
                                # with this probability (classifier-free guidance)
      cond_aug_max=0.0,         # super-resolution stages: the low-res input gets Gaussian noise
                                # of std U[0, cond_aug_max] (conditioning augmentation, Ho et al.
                                # 2022), its level embedded
      objective="diffusion",    # diffusion | classifier (noisy classifier p(c | x_t, t) for
                                # classifier guidance; model.num_classes = its K)
      init_from="",             # fine-tuning: a workdir (a run, or an imported model) whose
                                # weights a new run starts from, with a fresh optimiser, step 0,
                                # EMA = those weights, and this config's seed; its model settings
                                # must equal this config's. "" = off. Ignored (logged) when
                                # --workdir already has a checkpoint: that run resumes.
      init_from_ema=True,       # start from init_from's EMA params (what published models are and
                                # what one samples); False: its raw (non-EMA) params
      # Post-hoc EMA (Karras et al. 2024): also track power-function EMAs of these relative
      # widths, e.g. (0.05, 0.10), and save them every phema_snapshot_every steps to
      # <workdir>/phema; `python -m ddpm_jax.posthoc_ema` then builds the EMA of any sigma_rel.
      # () = off. The classic EMA (ema_decay) is kept either way.
      phema_sigma_rels=(),
      phema_snapshot_every=0,   # 0 = checkpoint_every
  ))

  config.optim = ml_collections.ConfigDict(dict(
      lr=2e-4,
      warmup_steps=5_000,
      grad_clip=1.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
  ))

  config.sampling = ml_collections.ConfigDict(dict(
      # ancestral | ddim | euler | euler_ancestral | heun | edm_stochastic | dpm_solver_pp
      # | dpm_solver_pp_sde | dpm_solver_pp_3m
      # (README "Samplers" table; ddpm_jax/sampling/__init__.py).
      sampler="ancestral",
      num_steps=1000,           # grid points (heun: 2N-1 model calls); ancestral: all T
                                # unless the model learns its variance (then respaced)
      eta=0.0,                  # DDIM noise
      s_churn=0.0,              # edm_stochastic (Karras et al. 2022, Alg. 2): churn >= 0,
      s_tmin=0.0,               # applied for sigma in [s_tmin, s_tmax] (sigma units;
      s_tmax=-1.0,              # -1 = inf), noise scale s_noise > 0. s_churn = 0 is heun.
      s_noise=1.0,
      grid="default",           # default (the sampler's own) | uniform | quadratic | trailing
                                # | logsnr | karras
      num_samples=50_000,
      batch_size=256,           # global
      use_ema=True,
      trajectory_every=100,     # record x_t and x0_hat every k sampler steps
      seed=1,
      low_res_input="",         # super-resolution stages: .npz or PNG folder of (H/f)x(W/f)
                                # images to upsample (--mode=sample)
      cond_aug=0.0,             # ... and the conditioning-augmentation noise std they get
      class_label=-1,           # conditional models: a class, or -1 for one of each in turn
      guidance_scale=0.0,       # classifier-free guidance w: (1 + w) eps(x, c) - w eps(x, null)
      guidance_t_min=0.0,       # guidance only for timestep indices in [t_min, t_max]
      guidance_t_max=-1.0,      # (Kynkaanniemi et al. 2024); -1 = T - 1, the whole range
      classifier_workdir="",    # classifier guidance: workdir of a training.objective=classifier
                                # run ("" = off); guides toward sampling.class_label
      classifier_scale=0.0,     # its scale s (Dhariwal & Nichol 2021, Alg. 1 / Alg. 2)
      guide_workdir="",         # autoguidance (Karras et al. 2024): workdir of a weaker model of
                                # the same data and parameterisation ("" = off), e.g. a smaller
                                # config or this run itself at an earlier guide_step
      guide_step=-1,            # its checkpoint step; -1 = its newest
      autoguidance_scale=0.0,   # w: D_guide + (1 + w) (D - D_guide); 0 = plain sampling.
                                # Shares the guidance_t_min / t_max interval.
  ))

  config.edit = ml_collections.ConfigDict(dict(
      task="inpaint",           # inpaint | sdedit (--mode=edit)
      input="",                 # .npz (key 'images' or 'samples', uint8 or [-1, 1]) or PNG folder
      mask="left_half",         # a named shape (sampling.editing.MASKS) or a PNG; white = known
      t0=500,                   # SDEdit: noise to this timestep index, then denoise
      class_label=-1,           # SDEdit target class; -1 = keep the sampling.class_label rule
      resample_jump=0,          # RePaint jump length (0 = plain replacement, no resampling)
      resample_count=0,         # RePaint jumps back per jump (r - 1 in Lugmayr et al. 2022)
      num_images=16,            # images taken from the input
  ))

  config.restore = ml_collections.ConfigDict(dict(
      task="sr2",               # --mode=restore: sr2 | sr4 | blur_gauss | blur_uniform |
                                # colourise | inpaint | denoise (core.degradations.TASKS)
      method="ddnm",            # ddnm | pigdm (sampling.restoration.METHODS), on sampling.sampler
      sigma_y=0.0,              # measurement noise std (on the [-1, 1] scale), >= 0
      input="",                 # .npz or PNG folder, as edit.input
      input_kind="truth",       # truth: clean images, measured here (y = A x + sigma_y n), and
                                # scored; measurement: y itself (low-res, grey, masked...)
      mask="random_half",       # inpaint: a named shape (sampling.editing.MASKS) or a PNG
      sigma_data=1.0,           # data std in r_t^2 = sd^2 s^2 / (alpha^2 sd^2 + s^2) (PiGDM)
      num_images=16,            # images taken from the input
  ))

  config.cascade = ml_collections.ConfigDict(dict(
      base_workdir="",          # --mode=cascade: the base run, sampled with its own config.json,
                                # whose samples this super-resolution stage upsamples
  ))

  config.eval = ml_collections.ConfigDict(dict(
      metrics=("bpd", "fid"),   # bpd | fid (FID and IS) | kid | precision_recall | digits_score
      batch_size=256,           # global
      bpd_num_examples=0,       # 0 = the whole eval split
      fid_split="train",        # reference statistics over this whole split
      inception_weights="",     # .npz of converted TF 2015-12-05 Inception weights
      fid_stats_dir="",         # cache of reference statistics (and, for kid and
                                # precision_recall, features); "" = <workdir>/fid_stats
      num_seeds=1,              # fid/kid/precision_recall over this many sample sets, seeds
                                # sampling.seed + 0, 1, ...; 3 = EDM's protocol (report min, mean)
      kid_num_subsets=100,      # KID: mean (and std) of the unbiased MMD^2 over random subsets
      kid_subset_size=1000,     # features per set and subset (at most the smaller set's count)
      pr_k=3,                   # precision/recall: manifold radius = distance to the k-th NN
      pr_num_features=50_000,   # at most this many features per set (a seeded random subset);
                                # 0 = all
  ))

  return config
