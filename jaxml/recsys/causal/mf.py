"""Matrix factorisation and its inverse-propensity-scored training loss (MF-IPS).

The predictor (as in Schnabel et al. 2016; Koren et al. 2009, with biases):

    Yhat_ui = <v_u, w_i> + a_u + b_i + c.

MF-IPS minimises the IPS estimate of the squared-error risk plus L2:

    (1 / (|U| |I|)) sum_{O=1} (Yhat_ui - Y_ui)^2 / P_ui + l2 * (|V|^2 + |W|^2 + |a|^2 + |b|^2).

On a minibatch of observed cells drawn uniformly, the mean of
`w_b (Yhat_b - Y_b)^2` with `w = (|O| / (|U| |I|)) / P` (`ips_weights`) is an
unbiased estimate of the first term, on the scale of an MSE (true
propensities give mean weight 1), so `l2` means the same as for naive MF
(weights 1). `self_normalize=True` divides by the batch's weight sum
instead (the SNIPS form, scale-free in the weights):

    sum_b w_b (Yhat_b - Y_b)^2 / sum_b w_b.

`mf_ips_loss(params, batch, rng, ...)` has the signature
`jaxml.train.make_train_step` expects (the key is unused: MF is deterministic).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxml.recsys.causal import _checks

Array = jax.Array
BATCH_KEYS = ("users", "items", "ratings", "weights")


def mf_init(rng: Array, n_users: int, n_items: int, dim: int, *, scale: float = 0.1,
            global_bias: float = 0.0) -> dict:
  """MF parameters: factors ~ N(0, scale^2), biases 0.

  Args:
    rng: a PRNG key.
    n_users, n_items: the matrix's shape.
    dim: the factor dimension.
    scale: the factors' initial standard deviation.
    global_bias: the initial `c` (e.g. the mean training rating).

  Returns:
    `{"user": [U, D], "item": [I, D], "user_bias": [U], "item_bias": [I], "bias": []}` float32.
  """
  for name, v in (("n_users", n_users), ("n_items", n_items), ("dim", dim)):
    if int(v) != v or v < 1:
      raise ValueError(f"{name} must be a positive integer, got {v}")
  ku, ki = jax.random.split(rng)
  return {"user": scale * jax.random.normal(ku, (n_users, dim), jnp.float32),
          "item": scale * jax.random.normal(ki, (n_items, dim), jnp.float32),
          "user_bias": jnp.zeros((n_users,), jnp.float32), "item_bias": jnp.zeros((n_items,), jnp.float32),
          "bias": jnp.asarray(global_bias, jnp.float32)}


def mf_apply(params: dict, users_B: Array, items_B: Array) -> Array:
  """Predictions `Yhat` for (user, item) pairs.

  Args:
    params: from `mf_init`.
    users_B, items_B: int [B] ids (any equal shapes).

  Returns:
    float32 predictions of the ids' shape.
  """
  _checks.same_shape("users_B", users_B, items_B=items_B)
  _checks.ids_in_range("users_B", users_B, params["user"].shape[0])
  _checks.ids_in_range("items_B", items_B, params["item"].shape[0])
  u = params["user"][users_B]
  i = params["item"][items_B]
  return jnp.sum(u * i, -1) + params["user_bias"][users_B] + params["item_bias"][items_B] + params["bias"]


def mf_scores(params: dict) -> Array:
  """Every cell's prediction: float32 [users, items]."""
  return (params["user"] @ params["item"].T + params["user_bias"][:, None] + params["item_bias"][None, :]
          + params["bias"])


def mf_ips_loss(params: dict, batch: dict, rng: Array | None = None, *, l2: float = 0.0,
                self_normalize: bool = False) -> tuple[Array, dict]:
  """The (SN)IPS-weighted squared error plus L2 (module docstring).

  Args:
    params: from `mf_init`.
    batch: `users` int [B], `items` int [B], `ratings` float [B] and
      `weights` float [B] (inverse-propensity weights, `ips_weights`; all
      ones is naive MF).
    rng: unused (the step's key).
    l2: the penalty on every parameter but the global bias.
    self_normalize: divide by the batch's weight sum (SNIPS) instead of B.

  Returns:
    `(loss, {"weighted_mse", "l2_penalty"})`.
  """
  del rng
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch lacks {missing}; an MF-IPS batch holds {list(BATCH_KEYS)}")
  pred = mf_apply(params, batch["users"], batch["items"])
  w = batch["weights"].astype(jnp.float32)
  sq = w * jnp.square(pred - batch["ratings"].astype(jnp.float32))
  data = jnp.sum(sq) / jnp.sum(w) if self_normalize else jnp.mean(sq)
  penalty = l2 * sum(jnp.sum(jnp.square(params[k])) for k in ("user", "item", "user_bias", "item_bias"))
  return data + penalty, {"weighted_mse": data, "l2_penalty": penalty}


def ips_weights(observed_UxI: Array, propensities_UxI: Array, *, clip: float | None = None) -> Array:
  """Inverse-propensity weights on the MSE scale: `(|O| / (|U| |I|)) / max(P, clip)` where observed, else 0.

  Args:
    observed_UxI: [users, items] 0/1 or boolean.
    propensities_UxI: [users, items] in (0, 1].
    clip: the minimum propensity, or None.

  Returns:
    float32 [users, items].
  """
  _checks.matrix("observed_UxI", observed_UxI)
  _checks.same_shape("observed_UxI", observed_UxI, propensities_UxI=propensities_UxI)
  _checks.mask("observed_UxI", observed_UxI)
  _checks.propensities("propensities_UxI", propensities_UxI)
  _checks.clip_value(clip)
  o = jnp.asarray(observed_UxI).astype(jnp.float32)
  p = jnp.asarray(propensities_UxI, jnp.float32)
  if clip is not None:
    p = jnp.maximum(p, clip)
  return o * (jnp.mean(o) / p)


def observed_batch(ratings_UxI, observed_UxI, weights_UxI=None) -> dict:
  """The observed cells as one MF-IPS batch (numpy; for full-batch training or to sample from).

  Args:
    ratings_UxI: [users, items] ratings (read where observed).
    observed_UxI: [users, items] 0/1 or boolean.
    weights_UxI: [users, items] weights, or None for ones (naive MF).

  Returns:
    `{"users": int32 [n], "items": int32 [n], "ratings": float32 [n], "weights": float32 [n]}`
    in row-major cell order.
  """
  _checks.matrix("ratings_UxI", ratings_UxI)
  _checks.same_shape("ratings_UxI", ratings_UxI, observed_UxI=observed_UxI, weights_UxI=weights_UxI)
  _checks.mask("observed_UxI", observed_UxI)
  users, items = np.nonzero(np.asarray(observed_UxI))
  if users.size == 0:
    raise ValueError("observed_UxI has no observed cell: the batch would be empty")
  w = np.ones(users.size, np.float32) if weights_UxI is None else np.asarray(weights_UxI, np.float32)[users, items]
  return {"users": users.astype(np.int32), "items": items.astype(np.int32),
          "ratings": np.asarray(ratings_UxI, np.float32)[users, items], "weights": w}
