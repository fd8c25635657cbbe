"""The topology-free training order: which records make global batch k, and the iterator
whose state is that one global batch count (see `input_pipeline.create_train_iterator`)."""

from typing import Any
from typing import Callable

from absl import logging
import grain
import numpy as np

# The iterator state's format tag; checkpoints without it predate the global order.
STATE_FORMAT = "global-order-v1"
_SHUFFLE_ROUNDS = 4


class GlobalOrder:
  """This process's rows of the global batch stream, as an (effectively endless) sequence.

  The training stream is the concatenation of epochs, epoch e being a permutation of all N
  records seeded by (seed, e) (grain's Feistel `index_shuffle`, so no O(N) table). Global batch
  k is stream positions q = k*B .. (k+1)*B - 1 (batches run on across epoch ends, so nothing
  is dropped and N < B works). Process p of P reads rows p*B/P .. (p+1)*B/P - 1 of each global
  batch; element i of this sequence is row p*B/P + i % (B/P) of batch `start + i // (B/P)`.
  Whether the record r at position q is flipped is drawn from a generator seeded by
  (seed, e, r). None of
  this depends on P, so every topology trains on the same global batches.
  """

  def __init__(self, source: Any, *, seed: int, global_batch: int, shard_index: int,
               shard_count: int, start: int, flip: bool):
    self._source, self._seed, self._flip = source, seed, flip
    self._num = len(source)
    self._global, self._local = global_batch, global_batch // shard_count
    self._row0, self._start = shard_index * self._local, start

  def __len__(self) -> int:
    return self._local * 2**40  # endless in practice (2**40 steps)

  def __repr__(self) -> str:
    return (f"GlobalOrder(source={self._source!r}, seed={self._seed}, batch={self._global}, "
            f"row0={self._row0}, start={self._start})")

  def position(self, index: int) -> int:
    """Stream position q of element `index`."""
    batch, row = divmod(index, self._local)
    return (self._start + batch) * self._global + self._row0 + row

  def record_index(self, position: int) -> tuple[int, int]:
    """(epoch, record index) of stream position q."""
    epoch, offset = divmod(position, self._num)
    epoch_seed = int(np.random.SeedSequence([self._seed, epoch]).generate_state(1)[0])
    if self._num == 1:
      return epoch, 0
    return epoch, int(grain.experimental.index_shuffle(offset, self._num - 1, epoch_seed,
                                                       _SHUFFLE_ROUNDS))

  def __getitem__(self, index: int) -> dict[str, Any]:
    epoch, record = self.record_index(self.position(index))
    flip = False
    if self._flip:
      flip = bool(np.random.default_rng([self._seed, epoch, record]).integers(2))
    return {"record": self._source[record], "flip": flip}


class TrainIterator:
  """This process's training batches, at a position that is one global batch count.

  `get_state()` is {"format", "position" (global batches consumed), "batch_size", "seed",
  "num_records"}: the same dict on every process and for every process count, so one copy
  (written by process 0) restores on any topology. `set_state` moves the iterator there; the
  grain pipeline (and its worker processes) is (re)built lazily on the next `next()`.
  """

  def __init__(self, make: Callable[[int], Any], state: dict[str, Any]):
    self._make, self._state, self._iterator = make, dict(state), None

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self.start_prefetch()
    batch = next(self._iterator)
    self._state["position"] += 1
    return batch

  def start_prefetch(self) -> None:
    self._iterator = iter(self._make(self._state["position"]))

  def get_state(self) -> dict[str, Any]:
    return dict(self._state)

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to `state["position"]`; the other fields must match this run's data."""
    if state.get("format") != STATE_FORMAT:
      raise ValueError(f"Data iterator state {state!r} is not in format {STATE_FORMAT!r}.")
    for key in ("num_records",):
      if state[key] != self._state[key]:
        logging.warning("The checkpoint's data iterator had %s=%s, this run has %s: the data "
                        "order from here on differs from the original run's.", key,
                        state[key], self._state[key])
    self._state["position"] = int(state["position"])
    self.close()

  def close(self) -> None:
    """Stops the grain pipeline (threads, worker processes); `next()` would start it again."""
    if self._iterator is not None and hasattr(self._iterator, "close"):
      self._iterator.close()
    self._iterator = None
