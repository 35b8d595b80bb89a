"""CTR towers on the simulator (or Criteo-format files).

  python -m experiments.ctr --config=experiments/configs/ctr.py --workdir=/tmp/ctr --mode=compare
  python -m experiments.ctr --config=experiments/configs/ctr.py:local --workdir=/tmp/ctr_local --mode=compare
  python -m experiments.ctr --config=experiments/configs/ctr.py --mode=train \
      --config.model.kind=dhen --config.data.criteo_train=train.tsv --config.data.criteo_test=test.tsv
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seeds = [0, 1]  # one run per seed (init + data order); PD is measured between the first two

  c.simulator = ml_collections.ConfigDict()
  c.simulator.n_dense = 4  # dense features (dense 0 is the per-query context)
  c.simulator.vocab_sizes = [200, 100, 100, 50, 50, 20, 20, 10]  # raw ids per categorical field (field 0 = query)
  c.simulator.group_size = 8  # examples per query group (pairs for the rank loss)
  c.simulator.base_rate = 0.1  # mean click rate (class imbalance)
  c.simulator.third_order = 0.3  # strength of the third-order crosses
  c.simulator.seed = 0  # the true parameters

  c.data = ml_collections.ConfigDict()
  c.data.n_train = 200_000  # simulator training examples
  c.data.n_test = 50_000  # simulator / Criteo test examples
  c.data.criteo_train = ""  # Criteo-format TSV(.gz) for training; empty = simulator
  c.data.criteo_test = ""  # held-out Criteo-format file (first n_test lines are used)
  c.data.criteo_buckets = 100_000  # hash buckets per Criteo categorical field

  c.model = ml_collections.ConfigDict()
  c.model.kind = "dcnv2"  # mlp | dcnv2 | dlrm | dhen (train mode)
  c.model.embed_dim = 8  # D
  c.model.hidden = [64, 32]  # top MLP widths
  c.model.bottleneck = 0  # low-rank factorisation of top-MLP layers (0 = none)
  c.model.activation = "relu"  # relu | smelu
  c.model.cross_layers = 3  # DCN-v2 cross layers
  c.model.cross_rank = 0  # 0 = full-rank cross
  c.model.dhen_modules = ["attention", "linear"]  # modules of every DHEN layer
  c.model.dhen_rows = [None, 8]  # output rows per module (None = input rows)
  c.model.dhen_layers = 2  # stacked DHEN layers
  c.model.attention_heads = 2  # heads of the feature self-attention module
  c.model.dhen_batch_chunks = 0  # DHEN layers on N interleaved batch slices; 0 = automatic (towers.dhen_chunks)

  c.train = ml_collections.ConfigDict()
  c.train.learning_rate = 3e-3  # Adam
  c.train.batch_size = 512  # a multiple of group_size keeps groups whole
  c.train.steps = 800  # steps per run
  c.train.optimizer = "adam"  # adam | adagrad | sgd

  # comparison mode
  c.bottleneck = ml_collections.ConfigDict()
  c.bottleneck.hidden = [256, 256]  # the wide MLP whose layers get bottlenecked
  c.bottleneck.ranks = [0, 32, 8]  # bottleneck widths k (0 = none)
  c.smelu_beta = 1.0  # SmeLU half-width b
  c.rank_weight = 1.0  # weight of the pairwise rank loss next to logloss
  c.distill = ml_collections.ConfigDict()
  c.distill.teacher_hidden = [256, 128]  # teacher: a wider DCN-v2
  c.distill.teacher_steps = 1500  # teacher training steps
  c.distill.student_hidden = [16]  # student: a small MLP
  c.distill.lam = 1.0  # weight of LL(teacher, p)

  if variant == "local":  # about a minute on a laptop CPU
    c.data.n_train, c.data.n_test = 40_000, 10_000
    c.train.steps = 200
    c.distill.teacher_steps = 300
    c.bottleneck.hidden = [64, 64]
    c.bottleneck.ranks = [0, 8]
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (use '' or 'local')")
  return c
