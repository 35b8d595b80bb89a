"""Model-agnostic training: optimizer, TrainState, the pure step, mesh + partition rules,
orbax checkpoints, the loop, and multi-host start-up."""
from jaxml.train.checkpoint import Checkpointer, restore_or_init
from jaxml.train.distributed import maybe_initialize_distributed
from jaxml.train.hostmem import relaunch_with_huge_pages
from jaxml.train.loop import MetricsWriter, NonFiniteLossError, TrainResult, plot_loss, read_metrics, train
from jaxml.train.optim import decay_mask, make_optimizer, path_str, warmup_cosine_schedule
from jaxml.train.sharding import (AXES, BATCH_AXES, LLAMA_RULES, batch_sharding, global_batch, make_mesh, spec_for,
                                  tree_shardings)
from jaxml.train.state import TrainState, abstract_train_state, create_train_state, init_train_state
from jaxml.train.step import jit_train_step, make_train_step
