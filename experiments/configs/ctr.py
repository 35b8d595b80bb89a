"""Config for `experiments/ctr.py`: CTR towers on the simulator (or Criteo-format files).

Variants (`--config=experiments/configs/ctr.py:<variant>`):
  default  the comparison table of the README (200k examples, 800 steps, 2 seeds).
  small    40k examples, 200 steps: about a minute per mode on a laptop CPU; tests shrink it further.

Run:
  python -m experiments.ctr --workdir=/tmp/ctr --mode=compare
  python -m experiments.ctr --workdir=/tmp/ctr_small --config=experiments/configs/ctr.py:small --mode=compare
  python -m experiments.ctr --workdir=/tmp/ctr_dhen --mode=train --config.model.kind=dhen \
      --config.data.criteo_train=train.tsv --config.data.criteo_test=test.tsv
Rerunning on the same workdir resumes (finished runs are loaded, the interrupted one continues
from its newest checkpoint); any field can be overridden, e.g. `--config.train.steps=100`,
`--config.model.hidden="(128, 64)"` (sequences are tuples, written as a string).
"""
import ml_collections


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variant = variant or "default"
  c = ml_collections.ConfigDict()
  c.mode = "train"  # "train": config.model over config.seeds; "compare": the comparison table
  c.seeds = (0, 1)  # train mode: one run per seed (init + data order); PD is measured between the first two

  c.simulator = ml_collections.ConfigDict()  # SimulatorConfig fields (jaxml.recsys.simulator)
  c.simulator.n_dense = 4  # dense features (dense 0 is the per-query context)
  c.simulator.vocab_sizes = (200, 100, 100, 50, 50, 20, 20, 10)  # raw ids per categorical field (field 0 = query)
  c.simulator.group_size = 8  # examples per query group (pairs for the rank loss)
  c.simulator.base_rate = 0.1  # mean click rate (class imbalance)
  c.simulator.third_order = 0.3  # strength of the third-order crosses
  c.simulator.seed = 0  # the true parameters

  c.data = ml_collections.ConfigDict()
  c.data.n_train = 200_000  # simulator training examples
  c.data.n_test = 50_000  # simulator / Criteo test examples
  c.data.criteo_train = ""  # Criteo-format TSV(.gz) for training (train mode); empty = simulator
  c.data.criteo_test = ""  # held-out Criteo-format file (first n_test lines are used); empty = criteo_train
  c.data.criteo_buckets = 100_000  # hash buckets per Criteo categorical field

  c.model = ml_collections.ConfigDict()  # TowerConfig fields (jaxml.recsys.config), plus embed_dim
  c.model.embed_dim = 8  # D, the FeatureConfig's embedding width
  c.model.kind = "dcnv2"  # mlp | dcnv2 | dlrm | dhen (train mode)
  c.model.hidden = (64, 32)  # top MLP widths
  c.model.bottleneck = 0  # low-rank factorisation of top-MLP layers (0 = none)
  c.model.activation = "relu"  # relu | smelu
  c.model.cross_layers = 3  # DCN-v2 cross layers
  c.model.cross_rank = 0  # 0 = full-rank cross
  c.model.dhen_modules = ("attention", "linear")  # modules of every DHEN layer
  c.model.dhen_rows = (None, 8)  # output rows per module (None = input rows)
  c.model.dhen_layers = 2  # stacked DHEN layers
  c.model.attention_heads = 2  # heads of the feature self-attention module
  c.model.dhen_batch_chunks = 0  # DHEN layers on N interleaved batch slices; 0 = automatic (towers.dhen_chunks)

  c.train = ml_collections.ConfigDict()  # TrainConfig fields (jaxml.recsys.train); seed comes from `seeds`
  c.train.learning_rate = 3e-3  # constant rate
  c.train.batch_size = 512  # a multiple of group_size keeps groups whole, and of data*fsdp of the mesh
  c.train.steps = 800  # steps per run; a larger value on a finished workdir trains its runs further
  c.train.optimizer = "adam"  # adam | adagrad | sgd (optax's defaults)

  c.loop = ml_collections.ConfigDict()  # LoopConfig fields (jaxml.recsys.experiment): how each run executes
  c.loop.mesh = (-1, 1, 1)  # (data, fsdp, tensor); -1 = all devices; without -1 the first data*fsdp*tensor
  c.loop.checkpoint_every = 200  # save every this many steps (and at the end / on SIGTERM)
  c.loop.keep = 2  # newest checkpoints kept per run
  c.loop.log_every = 50  # metrics.jsonl / TensorBoard record and progress line every this many steps
  c.loop.async_checkpoint = True  # write checkpoints in a background thread
  c.loop.tensorboard = True  # TensorBoard events under <run>/tb
  c.loop.allow_fresh_start = False  # start a run over when its checkpoints exist but none restores

  # compare mode
  c.bottleneck = ml_collections.ConfigDict()
  c.bottleneck.hidden = (256, 256)  # the wide MLP whose layers get bottlenecked
  c.bottleneck.ranks = (0, 32, 8)  # bottleneck widths k (0 = none)
  c.smelu_beta = 1.0  # SmeLU half-width b
  c.rank_weight = 1.0  # weight of the pairwise rank loss next to logloss
  c.distill = ml_collections.ConfigDict()
  c.distill.teacher_hidden = (256, 128)  # teacher: a wider DCN-v2
  c.distill.teacher_steps = 1500  # teacher training steps
  c.distill.student_hidden = (16,)  # student: a small MLP
  c.distill.lam = 1.0  # weight of LL(teacher, p)

  if variant == "default":
    pass
  elif variant == "small":  # about a minute per mode on a laptop CPU
    c.data.n_train, c.data.n_test = 40_000, 10_000
    c.train.steps = 200
    c.distill.teacher_steps = 300
    c.bottleneck.hidden = (64, 64)
    c.bottleneck.ranks = (0, 8)
    c.loop.checkpoint_every = 100
  else:
    raise ValueError(f"unknown ctr config variant {variant!r}; use default or small")
  return c
