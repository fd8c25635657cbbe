"""Sample-quality metrics. Import the submodule you need:

* ``fid``: ``FeatureStats`` (streaming mean/covariance, .npz I/O),
  ``frechet_distance``, ``inception_score``, ``extract_features``
  (NumPy/SciPy only).
* ``inception``: the FID Inception-v3 (TF 2015-12-05 graph) in Flax, with the
  local-weights loader ``load_inception_params`` and ``make_inception_fn``.
* ``digits_classifier``: the offline FD/IS analogue for the 8x8 digits
  default (``digits_score``), using a small classifier trained and cached
  on first use.

Nothing is imported here, so ``from ddpm_jax.metrics import fid`` stays free
of Flax and of the input pipeline.
"""
