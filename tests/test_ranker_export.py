"""The ranker's export (serving/ranker_export.py): the `rank` signature in a fresh
process scores as the trained ranker does, over the day's corpus baked in."""

import datetime
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from models import features
from models import ranker_trainer
from serving import ranker_export
from serving import versions
from tests import test_ranker as rl
from tests.trainer_testlib import REPO, world_examples

# Loads the export with nothing of this repository imported and asks `rank`.
_LOAD_AND_RANK = """
import json, sys
import tensorflow as tf
rank = tf.saved_model.load(sys.argv[1]).signatures["rank"]
request = json.loads(sys.argv[2])
inputs = {name: tf.constant(value) for name, value in request.items()}
inputs["timestamp"] = tf.cast(inputs["timestamp"], tf.int64)
print(json.dumps(rank(**inputs)["scores"].numpy().tolist()))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ranker_export"))
  rl._world(workdir)
  trainer = ranker_trainer.RankerTrainer(workdir, rl.SMALL)
  trainer.train_day(rl.DAY1, rl.planted_retrieve)
  result = ranker_export.export_day(trainer.model, workdir, rl.DAY1,
                                    trainer.trained_position())
  return workdir, trainer, result


def _request():
  """Three queries (history wider than max_history: cut, as in training); each with
  its own candidates: corpus items, an id the corpus lacks, and "" padding."""
  return {
      "user_id": ["u1", "u2", ""],
      "seed_item_id": ["i3", "", "i9"],
      "history_item_ids": [[f"i{i}" for i in range(12)], [""] * 12,
                           ["i1", "i2"] + [""] * 10],
      "device": ["web", "ios", ""],
      "country": ["fr", "", "us"],
      "timestamp": [1_709_600_000, 0, 1_709_700_000],
      "candidate_ids": [["i1", "i8", "new-item", ""], ["i2", "i3", "i4", "i5"],
                        ["i9", "", "", ""]],
  }


def test_rank_in_a_fresh_process_scores_as_the_trained_ranker(exported):
  workdir, trainer, result = exported
  assert result["dir"] == os.path.join(workdir, "exports", "ranker", "1")
  meta = versions.read_metadata(result["dir"])
  assert meta["day"] == rl.DAY1.isoformat() and meta["trained"]["complete"]
  request = _request()
  process = subprocess.run([sys.executable, "-c", _LOAD_AND_RANK, result["dir"],
                            json.dumps(request)], cwd="/", capture_output=True,
                           text=True, timeout=300, check=False,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  assert process.returncode == 0, process.stderr[-3000:]
  got = np.array(json.loads(process.stdout.strip().splitlines()[-1]), np.float32)
  # The in-memory ranker over the corpus's features of the same candidates.
  query = {name: tf.constant(request[name]) for name in features.QUERY_FEATURES}
  query["timestamp"] = tf.cast(query["timestamp"], tf.int64)
  ids = tf.constant(request["candidate_ids"])
  want = trainer.model.score_lists(query, trainer.table.lookup(ids)).numpy()
  padding = np.array(request["candidate_ids"]) == ""
  assert got.shape == (3, 4)
  assert np.all(np.isneginf(got[padding]))
  np.testing.assert_allclose(got[~padding], want[~padding], rtol=1e-4, atol=1e-5)
  # The corpus is baked in: i1's features (channel, topics) matter to its score.
  bare = trainer.model.score_lists(query, {**trainer.table.lookup(ids), "item_channel_id":
                                          tf.fill(ids.shape, "")}).numpy()
  assert not np.allclose(bare[0, :2], got[0, :2], atol=1e-5)


def test_labels_and_versions(exported):
  workdir, trainer, result = exported
  assert ranker_export.ranker_before(workdir, rl.DAY1) is None
  assert ranker_export.ranker_before(workdir, rl.DAY2) == result["dir"]
  assert ranker_export.ranker_of(workdir, rl.DAY1) == result["dir"]
  with pytest.raises(ValueError, match="refusing to label an export 2024-02-02"):
    ranker_export.export_day(trainer.model, workdir, rl.DAY2, trainer.trained_position())
  assert versions.list_versions(ranker_export.base_dir(workdir)) == [1]
