"""The two-tower model's configuration, saved as W/config.json on the first day.

A workdir trains one model for its whole life: the fields that decide variable
shapes or what the loss means (all but RUNTIME_FIELDS) must stay the same from day
to day, or a checkpoint would silently restore into a different model. The
RUNTIME_FIELDS are knobs that may change between days.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Mapping, Optional, Sequence

import tensorflow as tf

import estimators
from core import workdir as workdir_lib
from models.features import MAX_HISTORY

# Every estimator of estimators.ESTIMATORS, or no correction.
CORRECTIONS = (*estimators.ESTIMATORS, "none")
QUERY_ENCODERS = ("mean", "attention")
# Estimator arguments that have config fields of their own, passed to the
# estimators that take them (models.retrieval.make_frequency_estimator).
ESTIMATOR_FIELDS = {"num_buckets": "estimator_buckets", "num_hashes": "estimator_hashes",
                    "alpha": "estimator_alpha"}
OPTIMIZERS = ("adagrad", "adam", "sgd")

# Fields whose default changed after workdirs were written without them: a saved
# config that lacks one was trained with this value (read_config fills it in),
# so an old workdir keeps restoring into the model it trained.
LEGACY_VALUES: Mapping[str, Any] = {"seed_residual": False,
                                     "transition_embeddings": False,
                                     "pair_memory_successors": 0}

# The cheapest training regime: one pass over day D's own examples, in-batch
# negatives only, no transition tables (the defaults before issue 13's last
# round). The default trains on 8x the examples (4 days, twice) and draws 256
# uniform negatives a step; very large days may prefer this.
ONE_PASS: Mapping[str, Any] = {"transition_embeddings": False, "replay_days": 1,
                               "epochs_per_day": 1, "uniform_negatives": 0}

# Fields that may differ between days of the same workdir. The distillation
# fields change the loss from now on but not the model a checkpoint restores
# into, and a teacher trained in the same daily job is worth distilling from
# only after some days: distillation may start (or stop) on a running workdir.
RUNTIME_FIELDS = frozenset({"batch_size", "learning_rate", "checkpoint_every_steps",
                            "log_every_steps", "shuffle_buffer", "max_checkpoints",
                            "distill_weight", "distill_temperature",
                            "distill_candidates"})


class DayConfig:
  """What a frozen dataclass config of a workdir shares (ModelConfig, the ranker's):
  a JSON-able dict, strict construction from one, the architecture fields on
  which two configs differ (all but `runtime_fields`), and bound checks."""

  runtime_fields: ClassVar[frozenset[str]] = frozenset()

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> Any:
    """Builds a config; unknown keys are an error (a typo must not pass silently)."""
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**values)

  def incompatibilities(self, other: "DayConfig") -> list[str]:
    """The architecture fields on which `other` differs, as "name: a != b" lines."""
    mine, theirs = self.to_dict(), other.to_dict()
    return [f"{name}: {mine[name]!r} != {theirs[name]!r}" for name in sorted(mine)
            if name not in self.runtime_fields and mine[name] != theirs[name]]

  def require_at_least(self, bound: int, names: Sequence[str], prefix: str = "") -> None:
    """Raises ValueError naming the first of `names` whose value is below `bound`."""
    for name in names:
      if getattr(self, name) < bound:
        raise ValueError(f"{prefix}{name} must be >= {bound}, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig(DayConfig):
  """Sizes of the towers, the loss and the training loop.

  Attributes:
    embedding_dim: width of both towers' L2-normalised outputs.
    id_embedding_dim: width of the item-id (shared by seed, history, candidate) and
      user-id embeddings.
    feature_embedding_dim: width of the small categorical embeddings (device,
      country, channel, topics, hour, day of week).
    item_buckets, user_buckets, channel_buckets, topic_buckets, category_buckets:
      hash bucket counts; one extra row per table is the all-zero "absent" value.
    query_hidden, candidate_hidden: hidden ReLU layer widths of each tower's MLP.
    query_encoder: how the query tower reads the history: "mean" (of the items'
      embeddings) or "attention" (pooled by attention from the seed item, see
      models/towers.py).
    attention_heads: heads of the "attention" encoder, each id_embedding_dim wide.
    history_positions: "attention" adds a learned embedding of each history slot
      (recency: slot 0 is the most recent item).
    seed_residual: add a linear projection of the seed item's id embedding to the
      query MLP's output before normalisation (either encoder). On by default: it
      raised every validation figure on both datasets (README, issue 13).
    transition_embeddings: give the seed item and the candidate item each a table
      of their own, embedding_dim wide, added to their tower's output before it is
      normalised; their inner product is a factorised seed -> next item score (as
      in FPMC) with a full vector per item, where the seed residual only projects
      the shared id_embedding_dim-wide id embedding. On by default, with
      replay_days = 4, epochs_per_day = 2 and uniform_negatives = 256: together
      they won every validation figure on both datasets (README, issue 13).
    transition_scale: s > 0 multiplies both transition tables' vectors before they
      are added: s times their initial size and, as Adagrad's steps do not depend
      on the gradient's scale, about s times their learning rate, so that a pair
      seen once or twice moves the score more (memorisation, as co-visitation's
      counts do).
    transition_reverse_weight: w > 0 (needs transition_embeddings) adds w x an
      in-batch softmax over the transition tables alone, with each example's pair
      reversed: its item as the seed, its seed as the target
      (models/transition.py). A seed -> next table then also learns next -> seed,
      which co-visitation counts both ways.
    pair_memory_successors: M > 0 adds a pair memory (models/memory.py): the
      consecutive (seed, item) pairs of the log counted both ways, the M most
      counted partners of each seed kept, and `pair_memory_weight` x log(1 + the
      pair's count) / log(1 + the seed's top count) added to a pair's score in the
      exports (which merge the seed's partners into the search's results). The
      towers train without it. 0: none, scores are the towers' alone.
    pair_memory_weight: w > 0, that multiplier: the bonus of a seed's most
      counted partner. Chosen on the validation partitions (README, issue 13).
    temperature: softmax temperature; scores are <u, v> / temperature (plus the
      pair memory's bonus).
    max_history: history items kept per example (most recent first); the Beam job
      keeps as many per user (default models.features.MAX_HISTORY).
    batch_size: examples per step; the in-batch softmax's candidate count.
    replay_days: training day D streams the last `replay_days` data days up to
      and including D (days with data in W/data; D itself always last), in time
      order, so that small days give the model more than a handful of steps.
      Day D is still scored before it is trained on (test-then-train).
    epochs_per_day: passes over that window when training day D.
    replay_old_days: K > 0 streams, before that window, K data days drawn at
      random (seeded by D and `seed`, so a resumed day draws the same ones) from
      all those older than the window, oldest first: a long memory, so that what
      co-visitation counts over the whole log (pairs seen months ago) is seen
      again at bounded cost per day. Still only days before D.
    optimizer, learning_rate: the optimizer ("adagrad", "adam" or "sgd").
    correction: logQ correction: an estimator of estimators.ESTIMATORS
      ("streaming", the paper's; "exact", the oracle frequency count;
      "count_min"; "decayed_count") or "none".
    estimator_buckets, estimator_hashes, estimator_alpha: the hash array size H
      and hash function count m of the hashed estimators, and the EMA rate a of
      the gap estimators ("streaming", "exact" with method "gap"); each is
      passed only to the estimators that take it. The default a = 0.1 (the
      paper simulates 0.01 to 0.1) suits days of tens to hundreds of steps: at
      0.01 the estimate is still near its initial value after a week of such
      days, and the correction does little.
    estimator_options: further keyword arguments of the estimator of
      `correction` (estimators.make_estimator), e.g. {"init": "prior"} or, for
      "exact", {"method": "gap"}; an argument that estimator does not take is
      an error.
    uniform_negatives: N > 0 adds N items drawn uniformly (with replacement)
      from the day's corpus to each training step's in-batch candidates (mixed
      negative sampling); their logQ is log(N / corpus size). See
      models/negatives.py.
    checkpoint_every_steps: steps between checkpoints (one more at end of day).
    log_every_steps: steps between TensorBoard summaries and progress logs.
    shuffle_buffer: 0 keeps exact time order; n > 1 shuffles within consecutive,
      non-overlapping windows of n examples (deterministically, so resumable).
    max_checkpoints: checkpoints kept by the CheckpointManager.
    seed: initialisation seed.
    distill_weight: w >= 0; w > 0 adds w x the distillation term from a ranking
      teacher to the loss (models/distill.py); training then needs a teacher.
      0 (the default, and what a config.json without it means): no distillation.
    distill_temperature: T > 0 that softens both the teacher's and the student's
      in-batch softmax in that term (which is scaled by T^2).
    distill_candidates: K > 0 limits that term to the first K of each step's
      candidate columns (the teacher then scores B x K pairs, not B x B: a
      cross-feature teacher costs per pair); 0 keeps every column.
  """

  embedding_dim: int = 64
  id_embedding_dim: int = 32
  feature_embedding_dim: int = 8
  item_buckets: int = 200_000
  user_buckets: int = 100_000
  channel_buckets: int = 10_000
  topic_buckets: int = 2_000
  category_buckets: int = 100
  query_hidden: tuple[int, ...] = (128,)
  candidate_hidden: tuple[int, ...] = (128,)
  query_encoder: str = "mean"
  attention_heads: int = 1
  history_positions: bool = True
  seed_residual: bool = True
  transition_embeddings: bool = True
  transition_reverse_weight: float = 0.0
  transition_scale: float = 1.0
  pair_memory_successors: int = 100
  pair_memory_weight: float = 6.0
  temperature: float = 0.05
  max_history: int = MAX_HISTORY
  batch_size: int = 1024
  replay_days: int = 4
  epochs_per_day: int = 2
  replay_old_days: int = 0
  optimizer: str = "adagrad"
  learning_rate: float = 0.1
  correction: str = "streaming"
  estimator_buckets: int = 1 << 20
  estimator_hashes: int = 4
  estimator_alpha: float = 0.1
  estimator_options: dict[str, Any] = dataclasses.field(default_factory=dict)
  uniform_negatives: int = 256
  checkpoint_every_steps: int = 500
  log_every_steps: int = 100
  shuffle_buffer: int = 0
  max_checkpoints: int = 3
  seed: int = 0
  distill_weight: float = 0.0
  distill_temperature: float = 1.0
  distill_candidates: int = 0
  runtime_fields: ClassVar[frozenset[str]] = RUNTIME_FIELDS

  def __post_init__(self):
    # JSON turns tuples into lists; keep the dataclass hashable and comparable.
    object.__setattr__(self, "query_hidden", tuple(int(w) for w in self.query_hidden))
    object.__setattr__(self, "candidate_hidden",
                       tuple(int(w) for w in self.candidate_hidden))
    object.__setattr__(self, "estimator_options", dict(self.estimator_options))
    if self.correction not in CORRECTIONS:
      raise ValueError(f"correction must be one of {CORRECTIONS}, got {self.correction!r}")
    if self.query_encoder not in QUERY_ENCODERS:
      raise ValueError(f"query_encoder must be one of {QUERY_ENCODERS}, got "
                       f"{self.query_encoder!r}")
    doubled = sorted(set(self.estimator_options) & set(ESTIMATOR_FIELDS))
    if doubled:
      raise ValueError(f"estimator_options {doubled}: set "
                       f"{[ESTIMATOR_FIELDS[name] for name in doubled]} instead")
    if self.correction != "none":
      estimators.check_options(self.correction, self.estimator_options)
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
    if not self.temperature > 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}")
    self.require_at_least(1, (
        "embedding_dim", "id_embedding_dim", "feature_embedding_dim", "item_buckets",
        "user_buckets", "channel_buckets", "topic_buckets", "category_buckets",
        "max_history", "batch_size", "replay_days", "epochs_per_day", "attention_heads",
        "estimator_buckets", "estimator_hashes", "checkpoint_every_steps",
        "log_every_steps", "max_checkpoints"))
    self.require_at_least(0, ("shuffle_buffer", "uniform_negatives", "distill_candidates",
                              "replay_old_days", "pair_memory_successors"))
    if not self.distill_weight >= 0:
      raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")
    if not self.pair_memory_weight > 0:
      raise ValueError(f"pair_memory_weight must be > 0, got {self.pair_memory_weight}")
    if not self.transition_scale > 0:
      raise ValueError(f"transition_scale must be > 0, got {self.transition_scale}")
    if not self.transition_reverse_weight >= 0:
      raise ValueError("transition_reverse_weight must be >= 0, got "
                       f"{self.transition_reverse_weight}")
    if self.transition_reverse_weight and not self.transition_embeddings:
      raise ValueError("transition_reverse_weight > 0 needs transition_embeddings")
    if not self.distill_temperature > 0:
      raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    return cls.from_dict(json.loads(text))


# The fields apps expose as flags of their own (the rest via --config_overrides):
# (absl DEFINE_ kind, field, help, extra DEFINE_ arguments). Every such flag
# defaults to None, meaning W/config.json's value (else the dataclass default).
FLAG_FIELDS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("enum", "correction", "logQ correction.", {"enum_values": list(CORRECTIONS)}),
    ("float", "temperature", "Softmax temperature.", {}),
    ("integer", "batch_size", "Examples per step.", {"lower_bound": 1}),
    ("float", "learning_rate", "Optimizer learning rate.", {}),
    ("integer", "checkpoint_every_steps", "Global steps between checkpoints.",
     {"lower_bound": 1}),
    ("integer", "shuffle_buffer", "Window of the optional in-order shuffle (0: off).",
     {"lower_bound": 0}),
    ("float", "distill_weight", "Weight of the distillation term from a ranking "
     "teacher (0: off; > 0 needs a teacher).", {"lower_bound": 0.0}),
    ("float", "distill_temperature", "Temperature of the distillation term.", {}),
    ("integer", "distill_candidates", "Candidate columns the teacher scores per step "
     "(0: all).", {"lower_bound": 0}),
)


def read_config(path: str) -> ModelConfig:
  """Reads a config file written by `write_config`, naming the file on error."""
  with tf.io.gfile.GFile(path, "r") as f:
    text = f.read()
  try:
    values = json.loads(text)
    if not isinstance(values, dict):
      raise ValueError(f"expected a JSON object, got {type(values).__name__}")
    return ModelConfig.from_dict({**LEGACY_VALUES, **values})
  except (ValueError, TypeError) as e:
    raise ValueError(f"{path}: not a valid ModelConfig: {e}") from e


def write_config(config: ModelConfig, path: str) -> None:
  """Writes the config whole or not at all (core.workdir.atomic_write); any gfile path."""
  workdir_lib.atomic_write(path, config.to_json() + "\n")


def saved_config(workdir: str) -> Optional[ModelConfig]:
  """The config of W/config.json, or None before the workdir's first day."""
  path = workdir_lib.Workdir(workdir).config_path
  return read_config(path) if workdir_lib.exists(path) else None


def config_from_overrides(saved: Optional[ModelConfig], overrides: Mapping[str, Any]
                          ) -> Optional[ModelConfig]:
  """`saved` (or the default config) with `overrides`; None when there are none.

  None lets the trainer use W/config.json as it is (or the default on a new
  workdir). Whether the result is compatible with the saved config is
  `models.trainer.resolve_config`'s check.

  Raises:
    ValueError: an override that is not a ModelConfig field, or a bad value.
  """
  if not overrides:
    return None
  base = saved or ModelConfig()
  try:
    return ModelConfig.from_dict({**base.to_dict(), **overrides})
  except TypeError as e:  # a value of the wrong type, e.g. {"query_hidden": 5}
    raise ValueError(f"config overrides {dict(overrides)}: {e}") from e
