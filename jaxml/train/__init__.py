"""Model-agnostic training, the one core every model family trains through: optimizer,
TrainState (params, optimizer state, step, key, optional EMA, extras), the pure step
(built from a loss, or a family's own), mesh + partition rules, orbax checkpoints, the
loop, and multi-host start-up. The core names no model: each family owns its rules."""
from jaxml.train.checkpoint import (CheckpointMismatchError, Checkpointer, ConfigMismatchError,
                                    NoUsableCheckpointError, check_run_config, restore_or_init)
from jaxml.train.distributed import maybe_initialize_distributed
from jaxml.train.fitting import fit
from jaxml.train.hostmem import relaunch_with_huge_pages
from jaxml.train.loop import MetricsWriter, NonFiniteLossError, TrainResult, plot_loss, read_metrics, train
from jaxml.train.optim import decay_mask, make_optimizer, path_str, warmup_cosine_schedule
from jaxml.train.sharding import AXES, BATCH_AXES, batch_sharding, global_batch, make_mesh, spec_for, tree_shardings
from jaxml.train.state import TrainState, abstract_train_state, create_train_state, init_train_state, step_rng
from jaxml.train.step import (SMALL_TREE_NORM, ema_decay_at, global_norm, jit_train_step, make_train_step, scan_steps,
                              update_ema)
