"""Interaction modules as pure functions over plain parameter dicts.

Each module is an `*_init(rng, ...) -> params` / `*(params, x, ...) -> y` pair and
is usable alone. Shapes: B batch, F feature slots (rows), D embedding width,
M output rows, N = F * D flattened width, r low rank, E experts.

References: DCN-v2 (Wang et al., arXiv 2008.13535), DLRM (Naumov et al., 2019),
DHEN (Zhang et al., arXiv 2203.11014), SmeLU (Shamir et al., arXiv 2010.09931 /
2202.06499), bottleneck layers ("On the Factory Floor", arXiv 2209.05310).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxml import nn
from jaxml.nn import dense as linear, dense_init  # noqa: F401  (the towers' names for nn's dense layer)
from jaxml.nn.layers import layer_norm

Array = jax.Array


# ----------------------------------------------------------------------------- activations


def smelu(x: Array, beta: float = 1.0) -> Array:
  """Smooth ReLU: `0` for `x <= -b`, `(x + b)^2 / (4b)` for `|x| <= b`, `x` for `x >= b`.

  Value and first derivative are continuous at `x = +-b` (derivative 0 and 1).
  """
  quad = jnp.square(x + beta) / (4.0 * beta)
  return jnp.where(x <= -beta, jnp.zeros_like(x), jnp.where(x >= beta, x, quad))


def activation(name: str, beta: float = 1.0) -> Callable[[Array], Array]:
  if name == "relu":
    return jax.nn.relu
  if name == "smelu":
    return lambda x: smelu(x, beta)
  raise ValueError(f"unknown activation {name!r}")


# ----------------------------------------------------------------------------- dense layers
# Dense layers, bottlenecks and MLPs are `jaxml.nn`'s: `linear` is `nn.dense` and
# `dense_init` is `nn.dense_init`; `mlp_init` / `mlp` below keep the towers' call form.


def mlp_init(rng: Array, n_in: int, widths: tuple[int, ...], rank: int = 0) -> list[dict]:
  """`nn.mlp_init(rng, (n_in, *widths), rank=rank)`: a pyramid when the widths shrink; `rank` > 0 adds bottlenecks."""
  return nn.mlp_init(rng, (n_in, *widths), rank=rank)


def mlp(layers: list[dict], x: Array, act: Callable[[Array], Array] = jax.nn.relu, final_act: bool = True) -> Array:
  """`nn.mlp`, with `act` after the last layer too by default (the towers' hidden stacks)."""
  return nn.mlp(layers, x, act=act, final_act=final_act)


# ----------------------------------------------------------------------------- DCN-v2 cross


def cross_init(rng: Array, dim: int, rank: int = 0, experts: int = 1) -> dict:
  """One DCN-v2 cross layer over `[B, N]` (N = dim).

  Full rank: `w` [N, N], `b` [N]. Low rank: `v` [N, r] then `u` [r, N] (W = (v u)^T).
  Mixture of low-rank experts: `v` [E, N, r], `u` [E, r, N], `b` [E, N] and a gate `g` [N, E].
  """
  kw, kv, ku, kg = jax.random.split(rng, 4)
  if rank == 0:
    return {"w": nn.fan_in_normal(kw, (dim, dim), dim), "b": jnp.zeros((dim,), jnp.float32)}
  if experts == 1:
    return {"v": nn.fan_in_normal(kv, (dim, rank), dim), "u": nn.fan_in_normal(ku, (rank, dim), rank),
            "b": jnp.zeros((dim,), jnp.float32)}
  return {"v": nn.fan_in_normal(kv, (experts, dim, rank), dim), "u": nn.fan_in_normal(ku, (experts, rank, dim), rank),
          "b": jnp.zeros((experts, dim), jnp.float32), "g": nn.fan_in_normal(kg, (dim, experts), dim)}


def cross(p: dict, x0_BxN: Array, xl_BxN: Array) -> Array:
  """`x_{l+1} = x0 * (W x_l + b) + x_l` (elementwise `*`), DCN-v2 eq. (1).

  Low rank replaces `W x_l` by `U (V^T x_l)`; the mixture computes every expert
  `E_i = x0 * (U_i V_i^T x_l + b_i)` and adds `sum_i softmax(G x_l)_i E_i` to `x_l`.
  """
  if "g" in p:
    h_BxExN = jnp.einsum("bn,enr,erm->bem", xl_BxN, p["v"], p["u"]) + p["b"]
    experts_BxExN = x0_BxN[:, None, :] * h_BxExN
    gate_BxE = jax.nn.softmax(xl_BxN @ p["g"], axis=-1)
    return jnp.einsum("be,ben->bn", gate_BxE, experts_BxExN) + xl_BxN
  if "u" in p:
    return x0_BxN * ((xl_BxN @ p["v"]) @ p["u"] + p["b"]) + xl_BxN
  return x0_BxN * (xl_BxN @ p["w"] + p["b"]) + xl_BxN


def cross_net_init(rng: Array, dim: int, n_layers: int, rank: int = 0, experts: int = 1) -> dict:
  """`n_layers` cross layers with weights stacked on a leading axis (run by `lax.scan`)."""
  return jax.vmap(lambda k: cross_init(k, dim, rank, experts))(jax.random.split(rng, n_layers))


def cross_net(p: dict, x0_BxN: Array) -> Array:
  def step(xl, layer):
    return cross(layer, x0_BxN, xl), None

  out, _ = jax.lax.scan(step, x0_BxN, p)
  return out


# ----------------------------------------------------------------------------- DLRM dot


def dot_interaction(x_BxFxD: Array) -> Array:
  """DLRM pairwise dot products `<x_i, x_j>` for `i < j`: `[B, F (F - 1) / 2]`."""
  f = x_BxFxD.shape[1]
  z_BxFxF = jnp.einsum("bid,bjd->bij", x_BxFxD, x_BxFxD)
  iu, ju = jnp.triu_indices(f, k=1)
  return z_BxFxF[:, iu, ju]


# ----------------------------------------------------------------------------- LCE


def lce_init(rng: Array, rows_in: int, rows_out: int) -> dict:
  """Linear compression embedding: `w` [M, K] mixes K feature rows into M rows."""
  return {"w": nn.fan_in_normal(rng, (rows_out, rows_in), rows_in)}


def lce(p: dict, e_BxKxD: Array) -> Array:
  """`out[b] = W @ E[b]`: `[B, K, D] -> [B, M, D]`."""
  return jnp.einsum("mk,bkd->bmd", p["w"], e_BxKxD)


def lce_decomposed(w_user_MxKu: Array, w_cand_MxKc: Array, e_user_UxKuxD: Array, e_cand_BxKcxD: Array,
                   user_index_B: Array) -> Array:
  """LCE split into a user part and a candidate part.

  With `W = [W_user | W_cand]` and `E[b] = [E_user[u(b)] ; E_cand[b]]`,
  `W E[b] = W_user E_user[u(b)] + W_cand E_cand[b]`: the user term is computed
  once per user (U rows, U << B in serving) and gathered for its candidates.
  """
  per_user_UxMxD = jnp.einsum("mk,ukd->umd", w_user_MxKu, e_user_UxKuxD)
  return per_user_UxMxD[user_index_B] + jnp.einsum("mk,bkd->bmd", w_cand_MxKc, e_cand_BxKcxD)


# ----------------------------------------------------------------------------- attention


def attention_init(rng: Array, dim: int) -> dict:
  ks = jax.random.split(rng, 4)
  return {n: nn.fan_in_normal(k, (dim, dim), dim) for n, k in zip(("wq", "wk", "wv", "wo"), ks)}


def feature_attention(p: dict, x_BxFxD: Array, n_heads: int) -> Array:
  """Multi-head self-attention across the F feature embeddings (no mask): `[B, F, D]`.

  The q/k/v projections run as one `[B F, D] @ [D, 3 D]` matmul (weights concatenated
  on the fly, parameters stay `wq`, `wk`, `wv`) and the output projection as
  `[B F, D] @ [D, D]`: 2-D matmuls whose weight gradients are 2-D too. The
  `1 / sqrt(Dh)` score scale is folded into the `[D, D]` query weights (scaling the
  `[B, H, F, F]` scores or the `[B, H, F, Dh]` queries costs a pass over them). The
  softmax attention itself is `nn.attention_core` (hand-written backward), with the
  values transposed to its `[B, H, Dh, F]` layout by the copy that splits the heads.
  """
  b, f, d = x_BxFxD.shape
  dh = d // n_heads
  scale = 1.0 / jnp.sqrt(jnp.float32(dh))
  w_Dx3D = jnp.concatenate([p["wq"] * scale, p["wk"], p["wv"]], axis=1)
  qkv = (x_BxFxD.reshape(b * f, d) @ w_Dx3D).reshape(b, f, 3, n_heads, dh)
  q, k = jnp.transpose(qkv[:, :, :2], (2, 0, 3, 1, 4))  # each [B, H, F, Dh]
  vT = jnp.transpose(qkv[:, :, 2], (0, 2, 3, 1))  # [B, H, Dh, F]
  o_BxHxFxDh = nn.attention_core(q, k, vT)
  o_BFxD = jnp.transpose(o_BxHxFxDh, (0, 2, 1, 3)).reshape(b * f, d)
  return (o_BFxD @ p["wo"]).reshape(b, f, d)


# ----------------------------------------------------------------------------- inception


def inception_init(rng: Array, n_in: int, branch_widths: tuple[int, ...], rank: int = 0) -> dict:
  """Parallel heterogeneous branches: one dense layer per width, plus a low-rank cross branch.

  Branch i is `act(x W_i + b_i)`; the last branch is a rank-`rank` cross layer on x
  (full rank when rank = 0). Output width: `sum(branch_widths) + n_in`.
  """
  keys = jax.random.split(rng, len(branch_widths) + 1)
  return {"dense": [dense_init(k, n_in, w) for k, w in zip(keys[:-1], branch_widths)],
          "cross": cross_init(keys[-1], n_in, rank)}


def inception(p: dict, x_BxN: Array, act: Callable[[Array], Array] = jax.nn.relu) -> Array:
  branches = [act(linear(q, x_BxN)) for q in p["dense"]]
  branches.append(cross(p["cross"], x_BxN, x_BxN))
  return jnp.concatenate(branches, axis=-1)


# ----------------------------------------------------------------------------- DHEN


def dhen_module_init(rng: Array, name: str, rows_in: int, rows_out: int, dim: int, cross_rank: int = 0) -> dict:
  """Parameters of one DHEN interaction module mapping `[B, rows_in, D] -> [B, rows_out, D]`."""
  if name == "linear":
    return lce_init(rng, rows_in, rows_out)
  if name == "attention":
    return attention_init(rng, dim)
  if name == "dot":
    return dense_init(rng, rows_in * (rows_in - 1) // 2, rows_out * dim)
  if name == "dcn":
    return cross_init(rng, rows_in * dim, cross_rank)
  if name == "mlp":
    return dense_init(rng, rows_in * dim, rows_out * dim)
  raise ValueError(f"unknown DHEN module {name!r}")


def dhen_module(name: str, p: dict, x_BxFxD: Array, rows_out: int, n_heads: int = 1,
                act: Callable[[Array], Array] = jax.nn.relu) -> Array:
  b, f, d = x_BxFxD.shape
  if name == "linear":  # LCE
    return lce(p, x_BxFxD)
  if name == "attention":
    return feature_attention(p, x_BxFxD, n_heads)
  if name == "dot":  # AdvancedDLRM-style: pairwise dots, projected back to rows of width D
    return linear(p, dot_interaction(x_BxFxD)).reshape(b, rows_out, d)
  if name == "dcn":
    flat = x_BxFxD.reshape(b, f * d)
    return cross(p, flat, flat).reshape(b, f, d)
  if name == "mlp":
    return act(linear(p, x_BxFxD.reshape(b, f * d))).reshape(b, rows_out, d)
  raise ValueError(f"unknown DHEN module {name!r}")


def dhen_layer_init(rng: Array, modules: tuple[str, ...], module_rows: tuple[int, ...], rows_in: int, rows_out: int,
                    dim: int, cross_rank: int = 0) -> dict:
  """One DHEN layer. `module_rows`/`rows_out` come from `config.dhen_layer_rows`."""
  keys = jax.random.split(rng, len(modules) + 1)
  p = {"modules": [dhen_module_init(k, m, rows_in, r, dim, cross_rank) for k, m, r in zip(keys, modules, module_rows)],
       "ln_scale": jnp.ones((dim,), jnp.float32), "ln_bias": jnp.zeros((dim,), jnp.float32)}
  if rows_out != rows_in:  # shortcut is a linear projection when shapes differ
    p["shortcut"] = lce_init(keys[-1], rows_in, rows_out)
  return p


def dhen_layer(p: dict, x_BxFxD: Array, modules: tuple[str, ...], module_rows: tuple[int, ...], ensemble: str,
               n_heads: int = 1, act: Callable[[Array], Array] = jax.nn.relu) -> Array:
  """`Y = LayerNorm(Ensemble_i Interaction_i(X) + ShortCut(X))`, DHEN (arXiv 2203.11014).

  Ensemble "concat" stacks module outputs along the rows, "sum" adds them.
  ShortCut is the identity when the output has the input's rows, else an LCE
  projection. LayerNorm normalises each row over D.

  Every LCE of the layer (the "linear" modules and the shortcut projection) reads
  the same X, so they run as one LCE with their weights stacked along the output
  rows (`[sum M_i, K]`) and the result is split: the same multiply-adds, one
  matmul and one pair of layout transposes instead of one per LCE.
  """
  lces = [i for i, m in enumerate(modules) if m == "linear"]
  lce_ws = [p["modules"][i]["w"] for i in lces] + ([p["shortcut"]["w"]] if "shortcut" in p else [])
  lce_outs = {}
  if len(lce_ws) > 1:
    stacked_BxMxD = lce({"w": jnp.concatenate(lce_ws, axis=0)}, x_BxFxD)
    splits = np.cumsum([w.shape[0] for w in lce_ws])[:-1]
    parts = jnp.split(stacked_BxMxD, splits, axis=1)
    lce_outs = dict(zip(lces + ["shortcut"], parts))
  outs = [lce_outs[i] if i in lce_outs else dhen_module(m, q, x_BxFxD, r, n_heads, act)
          for i, (m, q, r) in enumerate(zip(modules, p["modules"], module_rows))]
  if ensemble == "concat":
    y = jnp.concatenate(outs, axis=1)
  elif ensemble == "sum":
    shapes = {o.shape for o in outs}
    if len(shapes) != 1:
      raise ValueError(f"sum ensemble needs equal module output shapes, got {[o.shape for o in outs]}")
    y = sum(outs[1:], outs[0])
  else:
    raise ValueError(f"ensemble must be 'concat' or 'sum', got {ensemble!r}")
  if "shortcut" in p:
    shortcut = lce_outs["shortcut"] if "shortcut" in lce_outs else lce(p["shortcut"], x_BxFxD)
  else:
    shortcut = x_BxFxD
  return layer_norm(y + shortcut, p["ln_scale"], p["ln_bias"])
