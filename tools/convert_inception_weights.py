r"""One-time conversion of pytorch-fid's Inception weights to a local .npz.

ddpm_jax never downloads anything. Make the FID Inception weights once, on a
machine with internet, and copy the resulting .npz to where evaluation runs:

  pip install torch            # a CPU build is enough
  pip install pytorch-fid      # optional: only for --compare
  wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  python tools/convert_inception_weights.py \
      --pth pt_inception-2015-12-05-6726825d.pth \
      --out inception_fid_2015-12-05.npz --compare

The .pth is pytorch-fid's port of TF's inception-2015-12-05 graph (the one
TTUR computes FID with): a state dict of torchvision's Inception3 layout with
the FID blocks. Its names map to ours (see ddpm_jax/metrics/inception.py):

  <m>.conv.weight [O, I, H, W]  ->  <m>/conv/kernel [H, W, I, O]
  <m>.bn.weight                 ->  <m>/bn/scale
  <m>.bn.bias                   ->  <m>/bn/bias
  <m>.bn.running_mean           ->  <m>/bn/mean
  <m>.bn.running_var            ->  <m>/bn/var
  <m>.bn.num_batches_tracked    ->  (dropped: training bookkeeping)
  fc.weight [1008, 2048]        ->  fc/kernel [2048, 1008]
  fc.bias                       ->  fc/bias

with '.' -> '/' in module paths (Mixed_6b.branch7x7_2 -> Mixed_6b/branch7x7_2).
pytorch-fid's BasicConv2d is BatchNorm2d(eps=0.001) with affine weights, so
BN scale and bias are both in the file and both mapped.

The output is checked with ``load_inception_params`` (every weight used, every
expected weight present with its shape); ``--compare`` also runs pytorch-fid on
the same images and prints the largest pool3 / logits differences.

This script is a tool: the package and its tests never import it.
"""

import argparse
import hashlib
import os
import re
import sys

import numpy as np

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
               "fid_weights/pt_inception-2015-12-05-6726825d.pth")

_BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean",
              "running_var": "var"}


def convert_state_dict(state_dict):
  """Maps a pytorch-fid state dict (name -> np.ndarray) to our flat layout.

  Raises:
    ValueError: listing every name that has no counterpart here.
  """
  out, unknown = {}, []
  for name, value in state_dict.items():
    value = np.asarray(value)
    module, _, leaf = name.rpartition(".")
    path = module.replace(".", "/")
    kind = module.rpartition(".")[2]
    if kind == "bn" and leaf == "num_batches_tracked":
      continue
    if kind == "conv" and leaf == "weight" and value.ndim == 4:
      out[f"{path}/kernel"] = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
    elif kind == "bn" and leaf in _BN_LEAVES:
      out[f"{path}/{_BN_LEAVES[leaf]}"] = value
    elif module == "fc" and leaf == "weight":
      out["fc/kernel"] = value.T  # torch Linear is [out, in].
    elif module == "fc" and leaf == "bias":
      out["fc/bias"] = value
    else:
      unknown.append(name)
  if unknown:
    raise ValueError(f'Unrecognised weights: {", ".join(sorted(unknown))}')
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _check_hash(path):
  """torch.hub names files <stem>-<sha256 prefix>.pth; verify that prefix."""
  match = re.search(r"-([0-9a-f]{8,})\.pth$", os.path.basename(path))
  if not match:
    print(f"note: {path} has no hash suffix; skipping the integrity check.")
    return
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  if not digest.hexdigest().startswith(match.group(1)):
    sys.exit(f"error: sha256 of {path} is {digest.hexdigest()}, expected "
             f"prefix {match.group(1)}; the download is corrupt or different.")


def _compare_with_pytorch_fid(torch_state, variables):
  """Runs pytorch-fid's network on the same inputs as ours."""
  import jax  # pylint: disable=g-import-not-at-top
  from pytorch_fid import inception as pfi  # pylint: disable=g-import-not-at-top,line-too-long
  import torch  # pylint: disable=g-import-not-at-top

  from ddpm_jax.metrics import inception  # pylint: disable=g-import-not-at-top

  # Feed pytorch-fid the local file instead of letting it download.
  pfi.load_state_dict_from_url = lambda *args, **kwargs: torch_state
  full = pfi.fid_inception_v3().eval()  # Whole net, fc included.
  pool3_net = pfi.InceptionV3([3]).eval()  # Resize + normalise + pool3.

  images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3),
                                             dtype=np.uint8)
  ours = jax.tree.map(np.asarray,
                      inception.make_inception_fn(variables)(images))
  with torch.no_grad():
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    theirs_pool3 = pool3_net(nchw)[0][:, :, 0, 0].numpy()
    x = torch.from_numpy(np.asarray(inception.preprocess(images)))
    theirs_logits = full(x.permute(0, 3, 1, 2)).numpy()
  for key, theirs in (("pool3", theirs_pool3), ("logits", theirs_logits)):
    diff = np.abs(ours[key] - theirs).max()
    scale = np.abs(theirs).max()
    print(f"{key}: max |ours - pytorch-fid| = {diff:.3g} "
          f"(max |value| {scale:.3g})")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--pth", help="pytorch-fid weights file (local).")
  parser.add_argument("--out", default="inception_fid_2015-12-05.npz")
  parser.add_argument("--compare", action="store_true",
                      help="also check parity against pytorch-fid.")
  args = parser.parse_args(argv)

  if not args.pth or not os.path.exists(args.pth):
    print(__doc__)
    print(f"Download the weights first (this script never downloads):\n  "
          f"{WEIGHTS_URL}")
    return 1
  _check_hash(args.pth)

  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch_state = torch.load(args.pth, map_location="cpu", weights_only=True)
  flat = convert_state_dict({k: v.numpy() for k, v in torch_state.items()})
  np.savez(args.out, **flat)

  from ddpm_jax.metrics import inception  # pylint: disable=g-import-not-at-top
  variables = inception.load_inception_params(args.out)  # Raises on mismatch.
  num_params = sum(v.size for v in jax.tree.leaves(variables["params"]))
  print(f"Wrote {args.out}: {len(flat)} arrays, {num_params:,} parameters "
        "(+ BatchNorm statistics); every name and shape matches the network.")
  if args.compare:
    _compare_with_pytorch_fid(torch_state, variables)
  return 0


if __name__ == "__main__":
  sys.exit(main())
