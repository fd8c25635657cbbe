"""The DiT backbone (Peebles & Xie 2023): its closed forms, its sizes against the paper, diffusers'
`DiTTransformer2DModel` as the reference for import and export, and a trained DiT run through the
drivers on each parameterisation."""

import json
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import cifar10_dit
from configs import digits_dit
from configs import workdir as workdir_config
from ddpm_jax import models
from ddpm_jax.config import factories
from ddpm_jax.config import validation
from ddpm_jax.evaluation import drivers
from ddpm_jax.interop import diffusers_dit_layout
from ddpm_jax.interop import diffusers_io
from ddpm_jax.interop import exporter
from ddpm_jax.interop import importer
from ddpm_jax.models import dit as dit_lib
from ddpm_jax.models import layers
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import train_state as train_state_lib
from ddpm_jax.training import train
from tests import diffusers_reference

from helpers import tiny_config

EPS32 = float(np.finfo(np.float32).eps)


def _tiny_dit_config(**overrides):
  """The tests' tiny config with a one-block DiT of width 32 (16 tokens of 2x2 pixels)."""
  return tiny_config(**{"model.name": "dit", "model.patch_size": 2, "model.hidden_size": 32,
                        "model.depth": 1, "model.num_heads": 2, **overrides})


def _formula_count(depth, d, p, c_in, c_out, num_classes, mlp_ratio=4):
  """DiT's parameter count by layer: per block adaLN (d x 6d + 6d), q, k, v, out (4 (d^2 + d)) and
  the MLP (2 r d^2 + r d + d); the patch embedding, the time MLP (256 d + d + d^2 + d), the label
  table ((K + 1) d) and the final layer (d x 2d + 2d, d p^2 C_out + p^2 C_out)."""
  block = 6 * d * d + 6 * d + 4 * (d * d + d) + 2 * mlp_ratio * d * d + mlp_ratio * d + d
  return (depth * block + p * p * c_in * d + d + 256 * d + d + d * d + d
          + (num_classes + 1) * d * (num_classes > 0) + 2 * d * d + 2 * d
          + d * p * p * c_out + p * p * c_out)


# Table 1 of Peebles & Xie 2023 (class-conditional ImageNet at 32x32x4 latents, patch 2, a learned
# variance: 8 output channels, 1,000 classes), in millions as the paper rounds them.
PAPER_MILLIONS = {"S": 33, "B": 130, "L": 458, "XL": 675}


@pytest.mark.parametrize("size", sorted(PAPER_MILLIONS))
def test_param_counts_match_the_paper(size):
  depth, d, heads = models.DIT_SIZES[size]
  module = models.DiT(patch_size=2, hidden_size=d, depth=depth, num_heads=heads, out_channels=8,
                      num_classes=1000)
  count = models.param_count(module, 32, 4)
  assert count == _formula_count(depth, d, 2, 4, 8, 1000)
  assert round(count / 1e6) == PAPER_MILLIONS[size]
  if size == "XL":
    # The DiT code prints 675,129,632 for DiT-XL/2: it counts its fixed position embedding
    # (256 tokens x 1152, a frozen nn.Parameter), which is a constant here.
    assert count + 256 * d == 675_129_632


def test_cifar10_dit_is_dit_b2():
  config = cifar10_dit.get_config()
  model = factories.create_model(config)
  assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == (12, 768, 12, 2)
  count = models.param_count(model, 32, 3)
  assert count == _formula_count(12, 768, 2, 3, 6, 0)
  assert round(count / 1e6) == 130


def test_at_initialisation_every_block_is_the_identity_and_the_output_is_zero():
  """adaLN-Zero: the modulation Linears start at zero, so every gate is 0 and each block returns
  its input bitwise; the final Linear starts at zero too, so the output is exactly 0."""
  model = models.TinyDiT(out_channels=2, num_classes=10)
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  t, y = jnp.array([0, 7, 19]), jnp.array([1, 10, 4])
  variables = model.init(jax.random.key(1), x, t, y, train=False)
  np.testing.assert_array_equal(model.apply(variables, x, t, y, train=False), 0.0)
  block = dit_lib.DiTBlock(num_heads=2)
  tokens = jax.random.normal(jax.random.key(2), (3, 16, 32))
  c = jax.random.normal(jax.random.key(3), (3, 32))
  block_vars = block.init(jax.random.key(4), tokens, c)
  np.testing.assert_array_equal(block.apply(block_vars, tokens, c), tokens)
  # With the gates made non-zero the block is no longer the identity (the test can fail).
  moved = jax.tree.map(lambda a: a + 0.1, block_vars)
  assert not np.array_equal(block.apply(moved, tokens, c), tokens)


def test_patchify_and_position_embedding_closed_forms():
  x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
  tokens = dit_lib.patchify(x, 4)
  assert tokens.shape == (2, 6, 48)
  # Token 4 is patch row 1, column 1: pixels [4:8, 4:8], flattened (row, col, channel).
  np.testing.assert_array_equal(tokens[:, 4], x[:, 4:8, 4:8, :].reshape(2, 48))
  np.testing.assert_array_equal(dit_lib.unpatchify(tokens, 4, 8, 12), x)
  pos = dit_lib.sincos_2d_pos_embed(8, 2, 3)
  row, col = 1, 2  # token 5
  w = 1.0 / 10_000.0 ** (np.arange(2) / 2.0)
  expected = np.concatenate([np.sin(col * w), np.cos(col * w), np.sin(row * w), np.cos(row * w)])
  np.testing.assert_allclose(pos[5], expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("heads", [1, 4])
def test_attention_equals_the_einsum_softmax_it_replaces(dtype, heads):
  """`layers.attention` (jax.nn.dot_product_attention, XLA on the CPU) against the U-Net's former
  einsum, softmax(q k^T / sqrt(D)) v with float32 logits. Both compute the same float32 products
  and sums, possibly in another order: a sum of D = 16 products moves by at most about
  D eps32 |sum of |terms||, and the softmax and the weighted sum of v (|v| <= 4) pass that on,
  so a float32 result is within 64 eps32 of the other. bfloat16 rounds the probabilities and the
  output to 8 bits (eps 2^-7 relative) once each, the same in both unless a float32 difference
  crosses a rounding boundary: then one output differs by one bfloat16 ulp, at most 2^-7 x 4."""
  key = jax.random.split(jax.random.key(0), 3)
  shape = (2, 24, heads, 16)
  q, k, v = (jnp.clip(jax.random.normal(kk, shape), -4, 4).astype(dtype) for kk in key)
  got = layers.attention(q, k, v)
  logits = jnp.einsum("bihd,bjhd->bhij", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits * 16 ** -0.5, axis=-1).astype(dtype)
  want = jnp.einsum("bhij,bjhd->bihd", weights, v)
  assert got.dtype == want.dtype == dtype
  bound = 64 * EPS32 if dtype == jnp.float32 else 2.0 ** -7 * 4
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=0, atol=bound)


def test_attention_picks_cudnn_only_for_half_precision_heads_on_a_gpu():
  pick = layers.attention_implementation
  assert pick(jnp.bfloat16, 64, "gpu") == "cudnn"
  assert pick(jnp.float16, 128, "cuda") == "cudnn"
  assert pick(jnp.float32, 64, "gpu") == "xla"  # cuDNN's flash attention is half-precision only
  assert pick(jnp.bfloat16, 36, "gpu") == "xla"  # head width not a multiple of 8
  assert pick(jnp.bfloat16, 256, "gpu") == "xla"
  assert pick(jnp.bfloat16, 64, "tpu") == "xla"
  assert pick(jnp.bfloat16, 64, "cpu") == "xla"
  assert pick(jnp.float32, 64) == "xla"  # this machine


@pytest.mark.parametrize("override,message", [
    ({"model.patch_size": 3}, r"divide data.image_size=8; valid choices: \[1, 2, 4, 8\]"),
    ({"model.num_heads": 3}, "divisible by model.num_heads=3"),
    ({"model.hidden_size": 30, "model.num_heads": 3}, "by 4"),
    ({"model.sr_factor": 2}, "super-resolution stage is the U-Net's only"),
    ({"model.dropout": 0.1}, "DiT has none"),
    ({"training.objective": "classifier", "model.num_classes": 10}, "noisy classifier"),
    ({"model.name": "vit"}, "'unet', 'dit'"),
])
def test_invalid_dit_settings_fail_naming_the_fix(override, message):
  with pytest.raises(ValueError, match=message):
    validation.validate(_tiny_dit_config(**override), mode="train", open_data=False)


# --- diffusers' DiTTransformer2DModel as the reference ---------------------------------------


def random_dit(seed: int = 0, *, num_classes: int = 10, in_channels: int = 1, out_channels=2,
               norm_eps: float = 1e-5, tie: bool = True) -> diffusers.DiTTransformer2DModel:
  """diffusers' DiT at the digits' size, every parameter random (the zero-initialised adaLN and
  output Linears included); with `tie`, each block's time and label embedder a copy of block
  0's (as in converted DiT checkpoints)."""
  model = diffusers.DiTTransformer2DModel(
      num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
      out_channels=out_channels, num_layers=3, sample_size=8, patch_size=2,
      num_embeds_ada_norm=num_classes, norm_eps=norm_eps).eval()
  model = diffusers_reference.randomise(model, seed)  # matrices N(0, 1/fan_in), biases N(0, 0.04)
  with torch.no_grad():
    if tie:
      first = model.transformer_blocks[0].norm1.emb.state_dict()
      for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
  return model


def torch_out(model, x_nhwc, t, labels) -> np.ndarray:
  with torch.no_grad():
    y = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
              class_labels=torch.from_numpy(labels)).sample
  return y.numpy().transpose(0, 2, 3, 1)


def load_workdir(workdir: str):
  config = workdir_config.get_config(workdir)
  model = factories.create_model(config)
  abstract = train_state_lib.abstract_params(config, model, mesh_lib.make_mesh())
  params, _ = checkpointing.restore_params(workdir, abstract)
  return config, model, params


def save(model, path: str, variance: str = "learned_range") -> str:
  model.save_pretrained(path)
  diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                          variance_type=variance).save_pretrained(path)
  return path


def rel_err(a, b) -> float:
  return float(np.abs(a - b).max() / np.abs(b).max())


def inputs(n: int = 4):
  x = np.random.default_rng(0).standard_normal((n, 8, 8, 1)).astype(np.float32)
  return x, np.array([0, 417, 999, 250][:n], np.int64)


def test_import_matches_diffusers_and_export_round_trips_bitwise(tmp_path):
  reference = random_dit(seed=1)
  src = save(reference, str(tmp_path / "src"))
  record = importer.import_checkpoint(src, str(tmp_path / "W"), digits_dit.get_config())
  copies = 2 * sum(p.numel() for p in reference.transformer_blocks[0].norm1.emb.parameters())
  assert record["params"] == sum(p.numel() for p in reference.parameters()) - copies
  config, model, params = load_workdir(str(tmp_path / "W"))
  assert (config.model.name, config.model.hidden_size, config.model.depth) == ("dit", 32, 3)
  assert (config.model.num_classes, config.diffusion.model_var) == (10, "learned_range")
  assert config.model.norm_eps == 1e-5
  x, t = inputs()
  labels = np.array([3, 10, 0, 9])  # 10: the null class
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t),
                                jnp.asarray(labels), train=False))
  assert rel_err(ours, torch_out(reference, x, t, labels)) <= 1e-5
  # Export writes the same tensors diffusers had, bitwise, and import(export(W)) is W.
  exporter.export_checkpoint(str(tmp_path / "W"), str(tmp_path / "out"))
  back = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path / "out")).eval()
  want = reference.state_dict()
  assert set(back.state_dict()) == set(want)
  for name, value in back.state_dict().items():
    assert torch.equal(value, want[name]), name
  importer.import_checkpoint(str(tmp_path / "out"), str(tmp_path / "W2"), digits_dit.get_config())
  _, _, params2 = load_workdir(str(tmp_path / "W2"))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)


def test_an_unconditional_diffusers_dit_folds_its_label_row_into_the_time_mlp(tmp_path):
  """num_embeds_ada_norm = 0: diffusers still adds its one label row to the conditioning; ours
  has no table and adds that row to the time MLP's last bias (the same sum, in another order:
  one float32 rounding of a value of size |bias + row| per conditioning entry)."""
  reference = random_dit(seed=2, num_classes=0, out_channels=1)
  src = save(reference, str(tmp_path / "src"), variance="fixed_large")
  importer.import_checkpoint(src, str(tmp_path / "W"), digits_dit.get_config())
  config, model, params = load_workdir(str(tmp_path / "W"))
  assert config.model.num_classes == 0 and "class_emb" not in params
  x, t = inputs()
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), train=False))
  assert rel_err(ours, torch_out(reference, x, t, np.zeros(4, np.int64))) <= 1e-5


def test_blocks_whose_embedders_differ_are_refused(tmp_path):
  src = save(random_dit(seed=3, tie=False), str(tmp_path / "src"))
  with pytest.raises(ValueError, match="differs from block 0's copy"):
    importer.import_checkpoint(src, str(tmp_path / "W"), digits_dit.get_config())
  assert not (tmp_path / "W").exists()


def test_latent_space_dits_are_refused_naming_the_mismatch(tmp_path):
  """The published DiT-XL-2 models: 4 input channels (VAE latents), 8 outputs, in a pipeline
  folder with a VAE. Both the bare transformer and the pipeline are refused before any write."""
  src = save(random_dit(seed=4, in_channels=4, out_channels=8), str(tmp_path / "src"))
  with pytest.raises(ValueError, match=r"in_channels=4: this is a latent-space DiT.*"
                                       r"data.num_channels=1"):
    importer.import_checkpoint(src, str(tmp_path / "W"), digits_dit.get_config())
  pipeline = tmp_path / "pipeline"
  os.makedirs(pipeline / "transformer")
  (pipeline / "model_index.json").write_text(json.dumps({
      "_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
      "vae": ["diffusers", "AutoencoderKL"],
      "scheduler": ["diffusers", "KarrasDiffusionSchedulers"]}))
  with pytest.raises(ValueError, match="latent-space DiT pipeline"):
    importer.import_checkpoint(str(pipeline), str(tmp_path / "W"), digits_dit.get_config())
  assert not (tmp_path / "W").exists()


def test_diffusers_defaults_are_the_installed_ones():
  import inspect  # pylint: disable=g-import-not-at-top
  signature = inspect.signature(diffusers.DiTTransformer2DModel.__init__)
  installed = {k: p.default for k, p in signature.parameters.items() if k != "self"}
  assert installed == diffusers_dit_layout.DIFFUSERS_DEFAULTS
  assert diffusers_io  # the folder reader is the U-Net's (tests/interop_test.py)


# --- a trained DiT through the drivers ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("parameterization", ["ddpm", "edm", "flow"])
def test_a_trained_dit_samples_with_guidance_and_evaluates(tmp_path, parameterization):
  """Two train steps of a class-conditional DiT (a learned variance under DDPM), then sampling
  with classifier-free guidance (and, under DDPM, the bound), as for the U-Net: the DiT plugs in
  where the U-Net does."""
  ddpm = parameterization == "ddpm"
  overrides = {"diffusion.parameterization": parameterization, "model.num_classes": 10,
               "training.num_train_steps": 2, "training.checkpoint_every": 2,
               "sampling.sampler": "dpm_solver_pp" if ddpm else "heun", "sampling.num_steps": 4,
               "sampling.num_samples": 8, "sampling.class_label": 3,
               "sampling.guidance_scale": 1.0, "eval.metrics": ("bpd",),
               "eval.bpd_num_examples": 8,
               **({"diffusion.model_var": "learned_range", "diffusion.loss": "hybrid"}
                  if ddpm else {})}
  workdir = str(tmp_path / parameterization)
  train.train_and_evaluate(_tiny_dit_config(**overrides), workdir)
  with np.load(drivers.sample(_tiny_dit_config(**overrides), workdir)) as data:
    samples = data["samples"]
  assert samples.shape == (8, 8, 8, 1) and samples.dtype == np.uint8
  if ddpm:  # --mode=eval (the bound); EDM's and flow's bound is the same driver, tested for the
    # U-Net in parameterization_test.py
    report = drivers.evaluate(_tiny_dit_config(**overrides), workdir)
    assert np.isfinite(report["bpd_total"]) and report["bpd_total"] > 0


def test_layer_norm_gradient_is_the_autodiff_of_its_formula():
  """The LayerNorm's hand-written VJP, dx = r (g - mean(g) - y mean(g y)), against JAX's autodiff
  of the forward formula. Both are float32 sums of d = 64 terms of size <= r |g| |y| with
  |y| <= sqrt(d) = 8, so they agree within a few d eps32 r max|g| |y|max; 64 x 8 eps32 r max|g|
  bounds that with room."""
  x = 3.0 * jax.random.normal(jax.random.key(0), (4, 10, 64)) + 1.0
  g = jax.random.normal(jax.random.key(1), x.shape)

  def plain(x):
    centred = x - x.mean(-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + 1e-6)

  got = jax.vjp(lambda x: dit_lib._layer_norm(x, 1e-6), x)[1](g)[0]  # pylint: disable=protected-access
  want = jax.vjp(plain, x)[1](g)[0]
  np.testing.assert_array_equal(dit_lib._layer_norm(x, 1e-6), plain(x))  # pylint: disable=protected-access
  r = float(jax.lax.rsqrt(jnp.square(x - x.mean(-1, keepdims=True)).mean(-1)).max())
  bound = 64 * 8 * EPS32 * r * float(jnp.abs(g).max())
  np.testing.assert_allclose(got, want, rtol=0, atol=bound)
  assert float(jnp.abs(want).max()) > 100 * bound  # the bound is far below the gradient itself


@pytest.mark.slow
def test_a_sharded_dit_run_is_autoguided_restores_and_snapshots_post_hoc_emas(tmp_path):
  """An unconditional DiT trained 4 steps with post-hoc EMA and its state sharded over the 4
  devices (training.shard_state): the loop's sample grid and post-hoc EMA snapshots read the
  gathered arrays; sampling autoguided by its own step-2 checkpoint is plain sampling bitwise at
  w = 0 and moves the samples at w = 2; zero-shot restoration (DDNM, noiseless 2x
  super-resolution) meets the measurement, A x^ = y, as for the U-Net (restore_cascade_test.py);
  and a replicated run resumes the sharded checkpoint."""
  from ddpm_jax.training import posthoc_ema_io  # pylint: disable=g-import-not-at-top
  common = {"training.num_train_steps": 4, "training.checkpoint_every": 2,
            "training.keep_checkpoints": 5, "training.phema_sigma_rels": (0.1,),
            "training.shard_state": True, "training.sample_every": 4,
            "optim.lr": 3e-3, "optim.warmup_steps": 0, "sampling.sampler": "ddim",
            "sampling.num_steps": 4, "sampling.num_samples": 8, "sampling.use_ema": False,
            "restore.num_images": 4}
  workdir = str(tmp_path / "dit")
  train.train_and_evaluate(_tiny_dit_config(**common), workdir)
  assert posthoc_ema_io.snapshot_path(workdir, 4).exists()
  assert (tmp_path / "dit" / "samples" / "grid_00000004.png").exists()

  def sample(**guide):
    config = _tiny_dit_config(**common, **{f"sampling.{k}": v for k, v in guide.items()})
    with np.load(drivers.sample(config, workdir)) as data:
      return data["samples"].astype(np.int32)

  plain = sample()
  np.testing.assert_array_equal(
      sample(guide_workdir=workdir, guide_step=2, autoguidance_scale=0.0), plain)
  guided = sample(guide_workdir=workdir, guide_step=2, autoguidance_scale=2.0)
  assert np.mean(np.abs(guided - plain)) > 1.0

  truth = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
  np.savez(tmp_path / "truth.npz", images=truth)
  config = _tiny_dit_config(**common, **{"restore.task": "sr2", "restore.method": "ddnm",
                                         "restore.input": str(tmp_path / "truth.npz")})
  report = drivers.restore(config, workdir)
  with np.load(report["npz"]) as out:
    y, restored = out["measurement"], out["output_float"]
  residual = np.asarray(drivers.restore_operator(config).A(restored)) - y
  assert np.abs(residual).max() <= 1e-5 * np.abs(y).max()
  resumed = {**common, "training.shard_state": False, "training.num_train_steps": 5}
  assert train.train_and_evaluate(_tiny_dit_config(**resumed), workdir)["step"] == 5
