"""ddpm_jax against PyTorch diffusers' `UNet2DModel` or `DiTTransformer2DModel` built as the same
network.

  pip install -e '.[bench]'
  python benchmarks/vs_diffusers.py --config=configs/cifar10.py --batches=8,32
  python benchmarks/vs_diffusers.py --config=configs/digits.py --batches=128
  python benchmarks/vs_diffusers.py --model=dit --config=configs/digits_dit.py --batches=128
  python benchmarks/vs_diffusers.py --batches=128 --precision=bfloat16 --torch_compile  # GPU

The peer is diffusers' `UNet2DModel` configured as the config's U-Net (the DDPM CIFAR-10 network
for configs/cifar10.py, 35,746,307 params), or with `--model=dit` its `DiTTransformer2DModel` as
the config's DiT (`model.name` is set to "dit"; the config's DiT sizes are used). The script stops
unless both count the same params (diffusers' DiT keeps a copy of the time and label embedder in
every block, and a one-row label table when unconditional: those copies are not counted). A DiT is
timed with a fixed variance and the eps MSE on both sides, as the U-Net is.
Three workloads, each at every batch size, timed alternately (ddpm_jax, diffusers, ddpm_jax, ...)
for `--rounds` rounds so that both see the same machine state:

  train step   one full DDPM update: draw t and noise, q(x_t | x_0), forward, backward, global-norm
               clip, Adam, EMA. Ours is the real jitted, sharded step of
               `ddpm_jax.training.train_step`; theirs is the loop of diffusers'
               train_unconditional example (model.train(), dropout on, mse on eps,
               `clip_grad_norm_`, `torch.optim.Adam`, EMA by
               `torch._foreach_lerp_`), with `loss.item()` as its per-step host sync.
  forward      one eval-mode forward pass (ours jitted; theirs under `torch.inference_mode`).
  sampler step one DDIM step: the model call plus the update, per step of a `--sampler_steps`
               loop (ours: our compiled DDIM loop; theirs: `DDIMScheduler.step` in a Python loop).

Each cell is the median over rounds of the mean time of `--iters` calls, each round starting with
one untimed call (the first call after the other framework ran is up to 40% slower). The ratio
column is ddpm_jax's throughput over diffusers' (> 1: we are faster).

Each framework runs in its own worker process, created once and driven alternately from this one,
so that both see the same machine state while neither runs inside the other's address space: with
both in one process (`--noisolate`), XLA's CIFAR-10 step after a PyTorch train step slowed from
1.36 s to 1.88 s on this machine, with the same page faults costing 3.4x the kernel time.

`--precision=bfloat16` runs ours with `model.dtype=bfloat16` (GroupNorm, softmax and the loss
stay float32) and theirs under `torch.autocast(bfloat16)`; `--torch_compile` wraps their model
in `torch.compile`. PyTorch runs on CUDA when it sees a GPU.
"""

import multiprocessing
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from benchmarks import perf
from ddpm_jax import sampling
from ddpm_jax.config import validation
from ddpm_jax.interop import diffusers_dit_layout
from ddpm_jax.interop import exporter
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import process_env
from ddpm_jax.runtime import train_state as train_state_lib
from tests.diffusers_reference import diffusers_unet

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cifar10.py", lock_config=True)
_BATCHES = flags.DEFINE_list("batches", ["8", "32"], "Batch sizes to time.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating A/B rounds per cell.")
_ITERS = flags.DEFINE_integer("iters", 3, "Calls timed per round (after one warm-up call).")
_SAMPLER_STEPS = flags.DEFINE_integer("sampler_steps", 4, "DDIM steps per timed sampler loop.")
_WORKLOADS = flags.DEFINE_list("workloads", ["train", "forward", "sampler"], "What to time.")
_MARKDOWN = flags.DEFINE_string("markdown", "", "Also write the table to this Markdown file.")
_PRECISION = flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16"],
                               "Compute dtype of both sides (params stay float32).")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", False, "torch.compile the diffusers model.")
_MODEL = flags.DEFINE_enum("model", "unet", ["unet", "dit"],
                           "The network: the config's U-Net, or its DiT (model.name=dit).")
_ISOLATE = flags.DEFINE_bool(
    "isolate", True, "Run each framework in its own worker process (as users run them), driven "
    "alternately from this one; --noisolate runs both in this process.")


class Ours:
  """The three workloads in ddpm_jax, on every local device."""

  def __init__(self, config, batch: int):
    setup = perf.train_setup(config, batch)
    self.state, self.step_fn, self.train_batch = setup.state, setup.step_fn, setup.batch
    self.x = jax.device_put(setup.images, mesh_lib.batch_sharding(setup.mesh))
    self.t = jnp.full((batch,), 500, jnp.int32)
    apply = setup.model.apply
    self.forward_fn = jax.jit(lambda p, x, t: apply({"params": p}, x, t, train=False))
    sampler = sampling.get_sampler("ddim", setup.tables,
                                   model_output=config.diffusion.model_output,
                                   model_var=config.diffusion.model_var,
                                   num_steps=_SAMPLER_STEPS.value)
    shape = setup.images.shape
    self.sample_fn = jax.jit(lambda p, r: sampler(
        lambda x_t, t_: apply({"params": p}, x_t, t_, train=False), r, shape)[0])

  def param_count(self) -> int:
    return train_state_lib.param_count(self.state.params)

  def train(self):
    self.state, metrics = self.step_fn(self.state, self.train_batch)
    jax.block_until_ready((self.state, metrics))

  def forward(self):
    jax.block_until_ready(self.forward_fn(self.state.params, self.x, self.t))

  def sampler(self):
    jax.block_until_ready(self.sample_fn(self.state.params, jax.random.key(1)))


class Theirs:
  """The same three workloads in PyTorch diffusers, channels-first as diffusers runs them."""

  def __init__(self, config, batch: int):
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top

    self.torch = torch
    torch.manual_seed(0)
    o = config.optim
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    self.dit = config.model.name == "dit"
    self.net = (_diffusers_dit(config) if self.dit else diffusers_unet(config)).to(self.device)
    self.model = torch.compile(self.net) if _TORCH_COMPILE.value else self.net
    self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                   enabled=_PRECISION.value == "bfloat16")
    self.ema = [p.detach().clone() for p in self.net.parameters()]
    self.opt = torch.optim.Adam(self.net.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    self.grad_clip, self.ema_decay = o.grad_clip, config.training.ema_decay
    self.scheduler = diffusers.DDPMScheduler(num_train_timesteps=config.diffusion.num_timesteps,
                                             beta_schedule=config.diffusion.schedule)
    self.ddim = diffusers.DDIMScheduler(num_train_timesteps=config.diffusion.num_timesteps,
                                        beta_schedule=config.diffusion.schedule)
    d = config.data
    rng = np.random.default_rng(0)
    self.images = torch.from_numpy(rng.uniform(
        -1, 1, (batch, d.num_channels, d.image_size, d.image_size)).astype(np.float32)).to(
            self.device)
    self.t = torch.full((batch,), 500, dtype=torch.long, device=self.device)
    self.labels = torch.zeros((batch,), dtype=torch.long, device=self.device)

  def _net(self, x, t):
    if self.dit:
      return self.model(x, t.expand(x.shape[0]), class_labels=self.labels).sample
    return self.model(x, t).sample

  def param_count(self) -> int:
    count = sum(p.numel() for p in self.net.parameters())
    if self.dit:  # the embedder copies of blocks 1.., and an unconditional model's one label row
      count -= sum(p.numel() for b in self.net.transformer_blocks[1:]
                   for p in b.norm1.emb.parameters())
      if not self.net.config.num_embeds_ada_norm:
        table = self.net.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        count -= table.weight.numel()
    return count

  def _sync(self):
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def train(self):
    torch, x0 = self.torch, self.images
    self.model.train()
    noise = torch.randn_like(x0)
    t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],),
                      device=self.device)
    x_t = self.scheduler.add_noise(x0, noise, t)
    with self.autocast:
      out = self._net(x_t, t)
    loss = torch.nn.functional.mse_loss(out.float(), noise)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
    self.opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, list(self.net.parameters()), 1.0 - self.ema_decay)  # pylint: disable=protected-access
    loss.item()  # the example's per-step host sync (its progress bar shows the loss)

  def forward(self):
    self.model.eval()
    with self.torch.inference_mode(), self.autocast:
      self._net(self.images, self.t)
    self._sync()

  def sampler(self):
    torch = self.torch
    self.model.eval()
    self.ddim.set_timesteps(_SAMPLER_STEPS.value)
    x = torch.randn_like(self.images)
    with torch.inference_mode():
      for t in self.ddim.timesteps:
        with self.autocast:
          eps = self._net(x, t.reshape(1).to(self.device))
        x = self.ddim.step(eps.float(), t, x, eta=0.0).prev_sample
    self._sync()


def _diffusers_dit(config):
  """diffusers' DiTTransformer2DModel as the config's DiT (the exporter's config mapping)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  kwargs = diffusers_dit_layout.dit_config_from_arch(exporter.fields(config))
  del kwargs["_class_name"]
  return diffusers.DiTTransformer2DModel(**kwargs)


def _time(fn, iters: int) -> float:
  start = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - start) / iters


def _config():
  config = _CONFIG.value
  with config.unlocked():
    config.model.dtype = _PRECISION.value
    if _MODEL.value == "dit":  # the DiT has no dropout; both sides learn eps with a fixed variance
      config.model.update(name="dit", dropout=0.0)
      config.diffusion.update(model_var="fixed_large", loss="mse")
    elif config.model.name != "unet":
      raise SystemExit(f"{config.model.name!r} config: pass --model={config.model.name}")
  validation.validate(config, mode="sample")
  return config


SIDES = {"ddpm_jax": Ours, "diffusers": Theirs}


def _handle(side: str, state: dict, msg: tuple):
  """One request to a side: ('build', batch) -> param count; ('time', workload, iters) -> s."""
  cmd, *args = msg
  if cmd == "describe":
    return _describe(side)
  if cmd == "build":
    state["impl"] = SIDES[side](_config(), args[0])
    return state["impl"].param_count()
  return _time(getattr(state["impl"], args[0]), args[1])


def _serve(side: str, conn, argv) -> None:
  """A worker process: one framework, requests over a pipe until None."""
  flags.FLAGS(argv)
  state = {}
  while (msg := conn.recv()) is not None:
    try:
      conn.send(_handle(side, state, msg))
    except Exception as e:  # pylint: disable=broad-except
      conn.send(e)


class Side:
  """A framework under test, in its own process (isolation) or in this one."""

  def __init__(self, side: str, isolate: bool):
    self.side, self.state, self.proc = side, {}, None
    if isolate:
      ctx = multiprocessing.get_context("spawn")
      self.conn, child = ctx.Pipe()
      self.proc = ctx.Process(target=_serve, args=(side, child, sys.argv), daemon=True)
      self.proc.start()

  def call(self, *msg):
    if self.proc is None:
      return _handle(self.side, self.state, msg)
    self.conn.send(msg)
    out = self.conn.recv()
    if isinstance(out, BaseException):
      raise out
    return out

  def close(self):
    if self.proc is not None:
      self.conn.send(None)
      self.proc.join()


def compare(sides: dict, batch: int, workloads) -> list[dict]:
  counts = {who: side.call("build", batch) for who, side in sides.items()}
  if len(set(counts.values())) != 1:
    raise SystemExit(f"parameter counts differ: {counts}; the peer is not the same network")
  rows = []
  for name in workloads:
    per_call = {who: [] for who in sides}
    for side in sides.values():
      side.call("time", name, 1)  # compile / warm up
    for _ in range(_ROUNDS.value):
      for who, side in sides.items():
        # The first call after the other framework ran pays for caches and memory the other
        # one took (up to +40% here, on both sides): one untimed call, then the timed ones.
        side.call("time", name, 1)
        per_call[who].append(side.call("time", name, _ITERS.value))
    div = _SAMPLER_STEPS.value if name == "sampler" else 1
    med = {who: statistics.median(v) / div for who, v in per_call.items()}
    rows.append(dict(workload=name, batch=batch, ours_s=med["ddpm_jax"],
                     theirs_s=med["diffusers"], ratio=med["diffusers"] / med["ddpm_jax"],
                     params=counts["ddpm_jax"]))
    print(f"  {name:<8} batch {batch:>4}: ddpm_jax {med['ddpm_jax'] * 1e3:8.1f} ms, "
          f"diffusers {med['diffusers'] * 1e3:8.1f} ms, ratio {rows[-1]['ratio']:.2f}x", flush=True)
  return rows


def table(rows, forward_by_batch) -> str:
  lines = ["| workload | batch | ddpm_jax ms | diffusers ms | ddpm_jax img/s | diffusers img/s "
           "| ratio | ours vs our forward |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    rel = r["ours_s"] / forward_by_batch[r["batch"]] if r["batch"] in forward_by_batch else float(
        "nan")
    lines.append(f"| {r['workload']} | {r['batch']} | {r['ours_s'] * 1e3:.1f} | "
                 f"{r['theirs_s'] * 1e3:.1f} | {r['batch'] / r['ours_s']:.1f} | "
                 f"{r['batch'] / r['theirs_s']:.1f} | **{r['ratio']:.2f}x** | {rel:.3f}x |")
  return "\n".join(lines)


def _describe(side: str) -> str:
  if side == "ddpm_jax":
    return (f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}, "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  return (f"torch {torch.__version__} on {'cuda' if torch.cuda.is_available() else 'cpu'} "
          f"({torch.get_num_threads()} threads{', compiled' if _TORCH_COMPILE.value else ''}), "
          f"diffusers {diffusers.__version__}")


def main(_):
  _config()  # fails fast on a bad config, before any worker starts
  sides = {who: Side(who, _ISOLATE.value) for who in SIDES}
  print(f"{_PRECISION.value}, {os.cpu_count()} CPUs, "
        f"{'one process per framework' if _ISOLATE.value else 'both in one process'}", flush=True)
  for who, side in sides.items():
    print(f"  {who}: {side.call('describe')}", flush=True)
  rows = []
  try:
    for batch in map(int, _BATCHES.value):
      rows += compare(sides, batch, _WORKLOADS.value)
  finally:
    for side in sides.values():
      side.close()
  print(f"params: {rows[0]['params']:,} each")
  forward = {r["batch"]: r["ours_s"] for r in rows if r["workload"] == "forward"}
  text = table(rows, forward)
  print(text)
  if _MARKDOWN.value:
    with open(_MARKDOWN.value, "w", encoding="utf-8") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  process_env.set_defaults()  # an entry point: before jax starts a backend
  app.run(main)
