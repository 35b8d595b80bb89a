"""Experts for Gato's control tasks: PPO on gymnax environments (the shared `jaxml.rl` pieces), scripted experts,
expert/random returns, and demonstration episodes kept at >= 80% of the expert return (Reed et al. 2022, Sec. 3.1).

PPO (Schulman et al. 2017) as one fully compiled step per iteration, `(state, None) -> (state, metrics)`
on `jaxml.train` (the key from `jt.step_rng`): roll out `num_envs` environments for `horizon` steps
from a reset, the environments auto-resetting (every step is used; `jaxml.rl.gae` with the episode
ends as `dones_BxT`, so nothing is bootstrapped across them, and each row's last step bootstrapped
with the critic's value of the state after it), GAE advantages, then `epochs` passes of `minibatches` clipped-surrogate updates (`jaxml.rl.ppo_policy_loss`,
`ppo_value_loss`, advantages whitened per minibatch with `jaxml.rl.whiten`), an entropy bonus.
Actor and critic are separate tanh MLPs (`jaxml.nn.mlp`); discrete actions are categorical,
continuous ones Gaussian with a learned state-independent log-std, clipped to the bounds.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxml import rl
from jaxml import train as jt
from jaxml import nn as jnn


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  num_envs: int = 16  # rollout rows per iteration
  horizon: int = 500  # steps per row (at least the task's episode limit for whole episodes)
  epochs: int = 4  # passes over each rollout
  minibatches: int = 4  # minibatches per pass
  gamma: float = 0.99
  lam: float = 0.95  # GAE lambda
  clip_eps: float = 0.2  # PPO clip range
  vf_coef: float = 0.5  # value-loss weight
  ent_coef: float = 0.01  # entropy bonus weight
  lr: float = 3e-3  # Adam (gradients clipped to norm 0.5)
  hidden: int = 64  # MLP width (two hidden layers, tanh)
  iterations: int = 40  # PPO iterations (rollout + updates)
  steps_per_call: int = 10  # iterations per compiled call; divides iterations

  def __post_init__(self):
    for name in ("num_envs", "horizon", "epochs", "minibatches", "hidden", "iterations", "steps_per_call"):
      if getattr(self, name) <= 0:
        raise ValueError(f"PPOConfig.{name} must be positive, got {getattr(self, name)}")
    if self.iterations % self.steps_per_call:
      raise ValueError(f"PPOConfig.iterations={self.iterations} must be a multiple of steps_per_call")
    if (self.num_envs * self.horizon) % self.minibatches:
      raise ValueError("PPOConfig.minibatches must divide num_envs * horizon")


class Space(NamedTuple):
  """An action space: `n` discrete actions, or a box of `dim` entries in [low, high] (n = 0)."""
  n: int
  dim: int = 0
  low: float = -1.0
  high: float = 1.0


def action_space(env: Any, env_params: Any) -> Space:
  sp = env.action_space(env_params)
  if hasattr(sp, "n"):
    return Space(int(sp.n))
  return Space(0, int(np.prod(sp.shape)), float(np.min(sp.low)), float(np.max(sp.high)))


def init_actor_critic(rng: jax.Array, obs_dim: int, space: Space, hidden: int) -> dict:
  k1, k2 = jax.random.split(rng)
  out = space.n or space.dim
  params = {"actor": jnn.mlp_init(k1, (obs_dim, hidden, hidden, out), out_scale=0.01),
            "critic": jnn.mlp_init(k2, (obs_dim, hidden, hidden, 1))}
  if not space.n:
    params["log_std"] = jnp.full((space.dim,), -0.5, jnp.float32)
  return params


def _features(obs):
  return jnp.reshape(obs, obs.shape[:1] + (-1,)).astype(jnp.float32)


def _dist(params, obs_BxO, space: Space):
  out = jnn.mlp(params["actor"], obs_BxO, act=jnp.tanh)
  value = jnn.mlp(params["critic"], obs_BxO, act=jnp.tanh)[:, 0]
  return out, value


def _logp_entropy(params, out, actions, space: Space):
  if space.n:
    logp_all = jax.nn.log_softmax(out)
    logp = jnp.take_along_axis(logp_all, actions[:, None].astype(jnp.int32), -1)[:, 0]
    return logp, -(jnp.exp(logp_all) * logp_all).sum(-1)
  log_std = params["log_std"]
  z = (actions - out) * jnp.exp(-log_std)
  logp = (-0.5 * z ** 2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
  return logp, jnp.broadcast_to((log_std + 0.5 * np.log(2 * np.pi * np.e)).sum(), logp.shape)


def ppo_act(params, obs_B, rng, space: Space, greedy: bool = False):
  """Actions `[B]` (or `[B, dim]`), their log-probabilities and the values."""
  out, value = _dist(params, _features(obs_B), space)
  if space.n:
    a = jnp.argmax(out, -1) if greedy else jax.random.categorical(rng, out)
  else:
    a = out if greedy else out + jnp.exp(params["log_std"]) * jax.random.normal(rng, out.shape)
  logp, _ = _logp_entropy(params, out, a, space)
  return a, logp, value


def env_action(a, space: Space):
  return a.astype(jnp.int32) if space.n else jnp.clip(a, space.low, space.high)


class Rollout(NamedTuple):
  obs: Any  # [B, T, *obs]
  actions: jax.Array  # [B, T] or [B, T, dim] (what the policy sampled; the env got them clipped)
  logp: jax.Array  # [B, T]
  values: jax.Array  # [B, T]
  rewards: jax.Array  # [B, T]
  mask: jax.Array  # [B, T] bool: the step belongs to the row's first episode
  dones: jax.Array  # [B, T] bool: the step ended its episode (terminated or truncated; the env reset after it)
  last_obs: Any  # [B, *obs] the observation after the last step


def rollout(policy: Callable, env: Any, env_params: Any, rng: jax.Array, num_envs: int, horizon: int) -> Rollout:
  """`num_envs` environments from a reset for `horizon` steps; `policy(obs_B, key) -> (actions, logp, values)`
  (actions as sampled; `env_act` is applied by the policy's caller through `policy`'s second output)."""
  k_reset, k_run = jax.random.split(rng)
  obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, num_envs), env_params)

  def body(carry, key):
    obs, state, alive = carry
    k_act, k_env = jax.random.split(key)
    a, env_a, logp, value = policy(obs, k_act)
    nobs, state, r, term, trunc, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
        jax.random.split(k_env, num_envs), state, env_a, env_params)
    done = term | trunc
    out = (obs, a, logp, value, r.astype(jnp.float32), alive, done)
    return (nobs, state, alive & ~done), out

  (last_obs, _, _), outs = jax.lax.scan(body, (obs, state, jnp.ones((num_envs,), bool)),
                                        jax.random.split(k_run, horizon))
  return Rollout(*(jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), o) for o in outs), last_obs)


def make_ppo_step(cfg: PPOConfig, env: Any, env_params: Any, space: Space, tx: Any):
  """The PPO iteration `(state, None) -> (state, metrics)` (module docstring)."""
  n = cfg.num_envs * cfg.horizon
  mb = n // cfg.minibatches

  def policy(params):
    def f(obs, key):
      a, logp, v = ppo_act(params, obs, key, space)
      return a, env_action(a, space), logp, v
    return f

  def loss(params, batch):
    out, value = _dist(params, batch["obs"], space)
    logp, ent = _logp_entropy(params, out, batch["actions"], space)
    adv = rl.whiten(batch["adv"], batch["mask"])
    pl, pm = rl.ppo_policy_loss(logp, batch["logp"], adv, batch["mask"], clip_eps=cfg.clip_eps)
    vl, _ = rl.ppo_value_loss(value, batch["values"], batch["returns"], batch["mask"], clip_eps=cfg.clip_eps)
    entropy = rl.masked_mean(ent, batch["mask"])
    return pl + cfg.vf_coef * vl - cfg.ent_coef * entropy, {**pm, "value_loss": vl, "entropy": entropy}

  grad_fn = jax.value_and_grad(loss, has_aux=True)

  def step(state: jt.TrainState, _):
    k_roll, k_perm = jax.random.split(jt.step_rng(state))
    traj = rollout(policy(state.params), env, env_params, k_roll, cfg.num_envs, cfg.horizon)
    mask = jnp.ones(traj.rewards.shape, jnp.float32)
    _, last_values = _dist(state.params, _features(traj.last_obs), space)
    adv, ret = rl.gae(traj.rewards, traj.values, mask, gamma=cfg.gamma, lam=cfg.lam, dones_BxT=traj.dones,
                      last_values_B=last_values)
    data = {"obs": _features(traj.obs.reshape((n,) + traj.obs.shape[2:])),
            "actions": traj.actions.reshape((n,) + traj.actions.shape[2:]),
            "logp": traj.logp.reshape(n), "values": traj.values.reshape(n), "adv": adv.reshape(n),
            "returns": ret.reshape(n), "mask": mask.reshape(n)}

    def update(carry, idx):
      params, opt_state = carry
      (l, m), g = grad_fn(params, jax.tree.map(lambda x: x[idx], data))
      updates, opt_state = tx.update(g, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), {"loss": l, **m}

    perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(k_perm, cfg.epochs))
    (params, opt_state), ms = jax.lax.scan(update, (state.params, state.opt_state),
                                           perms.reshape(cfg.epochs * cfg.minibatches, mb))
    metrics = {k: v.mean() for k, v in ms.items()}
    # Over the episodes that ended inside the rollout (the steps with an episode end at or after them).
    dones = traj.dones.astype(jnp.float32)
    finished = jnp.flip(jax.lax.cummax(jnp.flip(dones, 1), axis=1), 1)
    n_done = jnp.maximum(dones.sum(), 1.0)
    metrics["episode_return"] = (traj.rewards * finished).sum() / n_done
    metrics["episode_length"] = finished.sum() / n_done
    return state._replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

  return step


class ExpertPreempted(RuntimeError):
  """`train_ppo` stopped on SIGTERM after saving its checkpoint (the study returns `preempted=True`)."""


def train_ppo(env: Any, env_params: Any, cfg: PPOConfig, rng: jax.Array, workdir: str, *,
              log: Callable[[str], None] = print) -> tuple[dict, list[dict]]:
  """Trains (or resumes) a PPO expert on `jaxml.train.fit`. Returns `(params, records)`.

  `workdir` holds `metrics.jsonl` and `checkpoints/` (saved at the end, and on SIGTERM by the loop):
  a rerun with the same config restores the trained expert instead of training it again, and a run
  stopped part-way resumes; a changed `PPOConfig` raises, naming the fields. `rng` must be the same
  on a rerun (it is the state's key).
  """
  space = action_space(env, env_params)
  obs_dim = int(np.prod(env.observation_space(env_params).shape))
  tx, _ = jt.make_optimizer(cfg.lr, total_steps=cfg.iterations, kind="adam", schedule="constant", clip_norm=0.5,
                            eps=1e-5)
  init_fn = lambda r: init_actor_critic(r, obs_dim, space, cfg.hidden)
  step = jax.jit(jt.scan_steps(make_ppo_step(cfg, env, env_params, space, tx), cfg.steps_per_call),
                 donate_argnums=0)
  result = jt.fit(None, init_fn, tx, rng, step=step, num_steps=cfg.iterations, workdir=workdir,
                  record={"ppo": dataclasses.asdict(cfg), "env": type(env).__name__}, record_name="PPO expert config",
                  steps_per_call=cfg.steps_per_call, keep=1, log_every=cfg.steps_per_call, tensorboard=False,
                  plot=False, finite_keys=("loss",), print_fn=log)
  if result.preempted:
    raise ExpertPreempted(f"the PPO expert in {workdir} stopped at step {result.step} on SIGTERM (checkpoint saved); "
                          "rerun to resume")
  return result.state.params, jt.read_metrics(workdir)


# ----------------------------------------------------------------------------- scripted experts


def mountain_car_expert(obs_BxO: jax.Array) -> jax.Array:
  """Push in the direction of the velocity (2 = right, 0 = left): builds energy until the goal."""
  return jnp.where(obs_BxO[:, 1] >= 0, 2, 0).astype(jnp.int32)


def pendulum_expert(obs_Bx3: jax.Array) -> jax.Array:
  """Energy-based swing-up with a PD catch at the top, torques `[B, 1]` in [-2, 2] (Pendulum-v1).

  With theta = 0 upright, gymnax's dynamics are theta'' = 15 sin(theta) + 3u (g = 10, l = m = 1), so
  E = theta'^2 / 2 + 15 cos(theta) is conserved without torque and dE/dt = 3 u theta': far from the top,
  u = clip((15 - E) theta') drives E to the upright value 15; once cos(theta) > 0.85 the PD law
  u = clip(-(10 theta + 2 theta')) holds it there (linearised: theta'' = -15 theta - 6 theta').
  """
  c, s, w = obs_Bx3[:, 0], obs_Bx3[:, 1], obs_Bx3[:, 2]
  theta = jnp.arctan2(s, c)
  energy = 0.5 * w ** 2 + 15.0 * c
  swing = jnp.clip((15.0 - energy) * w, -2.0, 2.0)
  hold = jnp.clip(-(10.0 * theta + 2.0 * w), -2.0, 2.0)
  return jnp.where(c > 0.85, hold, swing)[:, None]


def breakout_expert(obs_Bx10x10xC: jax.Array) -> jax.Array:
  """Breakout-MinAtar: move the paddle (channel 0, bottom row) towards the ball's column (channel 1);
  actions 0/1/2 = stay/left/right (gymnax's minimal action set)."""
  ball = jnp.argmax(obs_Bx10x10xC[..., 1].sum(1), -1)
  paddle = jnp.argmax(obs_Bx10x10xC[:, -1, :, 0], -1)
  d = jnp.sign(ball - paddle)
  return jnp.where(d < 0, 1, jnp.where(d > 0, 2, 0)).astype(jnp.int32)


def catch_expert(obs_BxHxW: jax.Array) -> jax.Array:
  """Move the paddle (bottom row) under the falling ball: actions 0/1/2 = left/stay/right."""
  ball = jnp.argmax(obs_BxHxW[:, :-1].sum(1), -1)
  paddle = jnp.argmax(obs_BxHxW[:, -1], -1)
  return (jnp.sign(ball - paddle) + 1).astype(jnp.int32)


# ----------------------------------------------------------------------------- returns and demonstrations


class Episodes(NamedTuple):
  """Whole episodes from `collect`: per row the first `length` steps are one episode."""
  obs: np.ndarray  # [N, T, *obs]
  actions: np.ndarray  # [N, T] or [N, T, dim] as sent to the environment
  returns: np.ndarray  # [N]
  lengths: np.ndarray  # [N]


@functools.partial(jax.jit, static_argnames=("act_fn", "env", "num_envs", "horizon"))
def _collect(act_fn, env, env_params, rng, num_envs, horizon):
  def policy(obs, key):
    a = act_fn(obs, key)
    return a, a, jnp.zeros(a.shape[:1]), jnp.zeros(a.shape[:1])
  return rollout(policy, env, env_params, rng, num_envs, horizon)


def collect(act_fn: Callable, env: Any, env_params: Any, rng: jax.Array, num_episodes: int, horizon: int) -> Episodes:
  """Runs `act_fn(obs_B, key) -> env actions` for `num_episodes` whole episodes (one per row, compiled).

  `act_fn` is a static argument of the compiled rollout: `RandomPolicy`, `ScriptedPolicy` (equal when
  their fields are, so a second call reuses the compiled program) or `PPOPolicy`.
  """
  traj = _collect(act_fn, env, env_params, rng, num_episodes, horizon)
  mask = np.asarray(traj.mask)
  return Episodes(np.asarray(traj.obs), np.asarray(traj.actions), (np.asarray(traj.rewards) * mask).sum(1),
                  mask.sum(1).astype(np.int32))


@dataclasses.dataclass(frozen=True)
class RandomPolicy:
  """Uniform actions (a hashable `act_fn` for `collect`)."""
  space: Space

  def __call__(self, obs, key):
    n = obs.shape[0]
    if self.space.n:
      return jax.random.randint(key, (n,), 0, self.space.n)
    return jax.random.uniform(key, (n, self.space.dim), minval=self.space.low, maxval=self.space.high)


@dataclasses.dataclass(frozen=True)
class ScriptedPolicy:
  """A scripted expert `expert(obs_B) -> actions` (a module-level function) as an `act_fn` for `collect`."""
  expert: Callable

  def __call__(self, obs, key):
    del key
    return self.expert(obs)


class PPOPolicy:
  """A PPO policy as an `act_fn` for `collect` (hashed by identity: keep one object per parameter set)."""

  def __init__(self, params, space: Space, greedy: bool = False):
    self.params, self.space, self.greedy = params, space, greedy

  def __call__(self, obs, key):
    a, _, _ = ppo_act(self.params, obs, key, self.space, greedy=self.greedy)
    return env_action(a, self.space)


def keep_good(episodes: Episodes, expert_return: float, random_return: float, fraction: float = 0.8) -> Episodes:
  """The episodes whose return is at least `fraction` of the expert's (Gato keeps >= 80%).

  For negative returns (Acrobot, MountainCar) "80% of the expert return" is read on the scale from the
  random policy's return to the expert's: `R >= R_random + fraction * (R_expert - R_random)`."""
  threshold = expert_return * fraction if random_return >= 0 and expert_return > 0 else \
      random_return + fraction * (expert_return - random_return)
  keep = episodes.returns >= threshold
  return Episodes(*(x[keep] for x in episodes))


def normalised_score(returns: np.ndarray, expert_return: float, random_return: float) -> np.ndarray:
  """`(R - R_random) / (R_expert - R_random)` per episode."""
  return (np.asarray(returns, np.float64) - random_return) / (expert_return - random_return)


def bootstrap_interval(x: np.ndarray, rng: np.random.Generator, *, n: int = 2000, level: float = 0.95):
  """The mean and a percentile bootstrap interval `(mean, lo, hi)`."""
  x = np.asarray(x, np.float64)
  means = x[rng.integers(0, len(x), (n, len(x)))].mean(1)
  a = (1 - level) / 2
  return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))
