"""Causal recommendation throughput: MF-IPS / BPR training and full-ranking evaluation, jaxml vs PyTorch and RecBole.

  python -m benchmarks.causal_recsys_bench [--repeats=5] [--quick]

1. MF-IPS training examples/s: `jaxml.train.make_train_step` on `causal.mf.mf_ips_loss` (Adam,
   `steps_per_call` steps per compiled call, and 1) against the same step in eager PyTorch
   (`benchmarks/peer_torch_recsys.py`), ML-100K-shaped tables (943 x 1682, dim 64), batch 4096.
2. Full-ranking evaluation: every user x every item scored (U V^T + biases), training items
   masked to -inf, top-K; users/s, jaxml (`causal.metrics.mf_top_k`: one program, `lax.map`
   over user chunks, run on one share of the chunks per host thread, one thread per usable CPU)
   vs PyTorch (a loop over chunks of 256 users, which ran 1.0-1.4x faster than
   chunks of 2,048 in three runs), on a synthetic 20,000 x 10,000 matrix. jaxml three times: its
   default (chunks of 128 users, the compiled bound-and-filter kernel `jaxml.cpu_kernels.top_k`), the
   XLA-only blocked form (`top_k_blocked` with `auto_block`'s blocks, 40 items here) and the
   plain form (chunks of 2,048, `lax.top_k`), which return the same ids; and the floor any
   exact top-K pays, the same chunks scored and masked with only each row's maximum taken, on
   the same host threads (`full_rank_*_floor_*`), so `torch / floor` bounds the ratio.
3. RecBole 1.2.1's BPR on ML-100K with a temporal 90/10 split (its "TO" order): seconds per
   training epoch and per full-sort evaluation (Recall@20, NDCG@20), against jaxml's BPR
   (`causal.objectives.pda_loss` with gamma = 0, one epoch = |train| / batch steps, batch 2048,
   dim 64) and full ranking on the same split (`causal.movielens`): `full_sort_eval_s_jaxml` is
   `causal.metrics.ranking_metrics_from_sets` on the full MF score matrix (only users with test items
   ranked, ranks counted for users with few), `_test_users` `mf_ranking_metrics` (only those users
   scored, as RecBole does), `_top_k` `ranking_metrics` under jit (`lax.top_k` on every row); the
   three agree (`ml100k_eval_forms`).

  python -m benchmarks.causal_recsys_bench --metric_cpu_ab=15

instead times only the ML-100K metric call, each form and the score matrix alone, one-thread CPU
time in a process pinned to one core, the forms interleaved (`metric_cpu_ab`).

jaxml and the peer alternate round by round (one `PeerWorker` process; RecBole's data set and
trainer are built once), medians over rounds.
Ends with `name: value` lines.
"""
from __future__ import annotations

import concurrent.futures
import functools
import glob
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common import PeerWorker, median, pin_threads, print_results
from jaxml import cpu_kernels
from jaxml import train as jt
from jaxml.recsys.causal import metrics, mf, movielens, objectives
from jaxml.train import hostmem

flags.DEFINE_integer("repeats", 5, "rounds (median)")
flags.DEFINE_integer("threads", None, "CPUs for both sides: this process is pinned to that many before JAX "
                     "starts, and torch runs as many threads (default: the CPUs this process may use)")
flags.DEFINE_bool("quick", False, "smaller shapes and fewer rounds (smoke test)")
flags.DEFINE_integer("metric_cpu_ab", 0, "instead: this many interleaved rounds of the ML-100K metric call's "
                     "one-thread CPU time, each form of `ml100k_eval_forms` (`metric_cpu_ab`)")
flags.DEFINE_bool("recbole", True, "run RecBole's BPR (needs its trainer's imports in the peer environment)")
FLAGS = flags.FLAGS

PEER = pathlib.Path(__file__).with_name("peer_torch_recsys.py")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def ml100k_path() -> str:
  hits = sorted(glob.glob(str(ROOT / ".venv-peer" / "lib" / "python3*" / "site-packages" / "recbole" /
                              "dataset_example" / "ml-100k" / "ml-100k.inter")))
  return hits[0] if hits else ""


def _adam(lr):
  return jt.make_optimizer(lr, total_steps=1, kind="adam", schedule="constant", clip_norm=None, b1=0.9, b2=0.999,
                           eps=1e-8)[0]


def mf_ips_step(n_users, n_items, dim, batch, steps_per_call):
  """(compiled step, state, stacked batch) for MF-IPS on a fixed random batch."""
  rng = np.random.default_rng(0)
  b = {"users": rng.integers(0, n_users, batch).astype(np.int32), "items": rng.integers(0, n_items, batch).astype(np.int32),
       "ratings": rng.integers(1, 6, batch).astype(np.float32), "weights": (rng.random(batch) + 0.5).astype(np.float32)}
  tx = _adam(1e-2)
  state, _ = jt.init_train_state(lambda r: mf.mf_init(r, n_users, n_items, dim), tx, jax.random.PRNGKey(0))
  loss = functools.partial(mf.mf_ips_loss, l2=1e-4)
  step = jax.jit(jt.make_train_step(loss, tx, steps_per_call=steps_per_call), donate_argnums=0)
  if steps_per_call > 1:
    b = {k: np.broadcast_to(v, (steps_per_call, *v.shape)).copy() for k, v in b.items()}
  return step, state, {k: jnp.asarray(v) for k, v in b.items()}


def time_steps(step, state, batch, calls):
  state, m = step(state, batch)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(calls):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  return (time.perf_counter() - t) / calls, state


@functools.partial(jax.jit, static_argnums=(2, 3))
def _row_max_chunks(params, train, chunk, n_chunks, offset):
  """Chunks `[offset, offset + n_chunks * chunk)` scored and masked as `mf_top_k` does, only each row's maximum kept."""
  u, v, bu = params["user"], params["item"], params["user_bias"]
  bi = params["item_bias"] + params["bias"]

  def one(i):
    cut = lambda x: jax.lax.dynamic_slice_in_dim(x, offset + i * chunk, chunk, axis=0)  # noqa: E731
    return jnp.where(cut(train), -jnp.inf, cut(u) @ v.T + cut(bu)[:, None] + bi[None, :]).max(1)

  return jax.lax.map(one, jnp.arange(n_chunks))


def _row_max_floor(params, train, chunk):
  """The floor of a top-K: the whole chunks of `mf_top_k`'s shards, each shard on its host thread."""
  shards = metrics._host_shards(train.shape[0] // chunk, 0, chunk, metrics._cpu_threads())
  with concurrent.futures.ThreadPoolExecutor(len(shards)) as pool:
    return list(pool.map(lambda sh: jax.block_until_ready(_row_max_chunks(params, train, chunk, sh[1],
                                                                          jnp.int32(sh[0]))), shards))


def full_rank_jax(n_users, n_items, dim, k, density):
  """{name: once()}: every user's top-k, training items masked (`causal.metrics.mf_top_k`): two forms, the floor."""
  key = jax.random.split(jax.random.PRNGKey(0), 5)
  params = {"user": jax.random.normal(key[0], (n_users, dim)), "item": jax.random.normal(key[1], (n_items, dim)),
            "user_bias": jax.random.normal(key[2], (n_users,)), "item_bias": jax.random.normal(key[3], (n_items,)),
            "bias": jnp.zeros(())}
  train = jax.random.uniform(key[4], (n_users, n_items)) < density
  if not cpu_kernels.available():
    raise SystemExit("jaxml.cpu_kernels.top_k is not available here (see the warning above): no default form")
  forms = {"kernel": lambda: metrics.mf_top_k(params, train, k),
           "blocked": lambda: metrics.mf_top_k(params, train, k, block=metrics.auto_block(n_items, k)),
           "plain": lambda: metrics.mf_top_k(params, train, k, chunk=2048, block=None),
           "floor": lambda: _row_max_floor(params, train, 128)}
  want = forms["plain"]()
  for name in ("kernel", "blocked"):
    if not np.array_equal(forms[name](), want):
      raise AssertionError(f"mf_top_k's {name} and plain forms disagree")
  for f in forms.values():
    jax.block_until_ready(f())
  return forms


def bpr_epoch_jax(split, batch, dim, steps):
  users, items, stages = split["train_users"], split["train_items"], split["train_stages"]
  n_i = split["n_items"]
  pop = np.ones((int(stages.max()) + 1, n_i), np.float32)          # gamma = 0: popularity unused
  tx = _adam(1e-3)
  state, _ = jt.init_train_state(lambda r: mf.mf_init(r, split["n_users"], n_i, dim), tx, jax.random.PRNGKey(0))
  loss = functools.partial(objectives.pda_loss, gamma=0.0)
  step = jax.jit(jt.make_train_step(loss, tx, steps_per_call=steps), donate_argnums=0)
  rng = np.random.default_rng(0)

  def epoch_batches():
    k = rng.integers(0, users.size, (steps, batch))
    neg = rng.integers(0, n_i, (steps, batch))
    return {"users": jnp.asarray(users[k], jnp.int32), "pos_items": jnp.asarray(items[k], jnp.int32),
            "neg_items": jnp.asarray(neg, jnp.int32), "pos_pop": jnp.asarray(pop[stages[k], items[k]]),
            "neg_pop": jnp.asarray(pop[stages[k], neg])}

  holder = {"state": state}

  def once():
    b = epoch_batches()                                             # host sampling is part of the epoch
    holder["state"], m = step(holder["state"], b)
    jax.block_until_ready(m)

  once()
  return once, holder


def ml100k_eval_forms(test, train, params):
  """{name: evaluate(params)}: Recall@20 and NDCG@20 of MF's full ranking on the split; three forms, one result.

  All items ranked for every user with test items, training items masked, means over those users; one
  compiled program each, the masks as arguments (as closure constants XLA spends seconds
  constant-folding them). "top_k": `ranking_metrics(mf_scores(params), test, train)` under jit, which
  ranks every user's row with `lax.top_k`. "sets": `ranking_metrics_from_sets` on the same score matrix
  with `relevant_sets(test, train)`, built once on the host (RecBole's full-sort loader, too, keeps
  each user's test items from the start): only users with test items ranked, ranks counted for those
  with few. "test_users": `mf_ranking_metrics`, which also scores only those users (as RecBole's
  full-sort evaluation does). Also returns the seconds `relevant_sets` took.
  """
  metrics.ranking_metrics(mf.mf_scores(params), test, train, (20,))    # value checks (skipped under jit)
  t = time.perf_counter()
  sets = metrics.relevant_sets(test, train)
  sets_s = time.perf_counter() - t
  top_k = jax.jit(lambda p, te, tr: metrics.ranking_metrics(mf.mf_scores(p), te, tr, (20,)))
  from_sets = jax.jit(lambda p, rs, tr: metrics.ranking_metrics_from_sets(mf.mf_scores(p), rs, tr, (20,)))
  test_users = jax.jit(lambda p, rs, tr: metrics.mf_ranking_metrics(p, rs, tr, (20,)))
  forms = {"sets": lambda p: from_sets(p, sets, train), "test_users": lambda p: test_users(p, sets, train),
           "top_k": lambda p: top_k(p, test, train)}
  got = {name: {k: float(v) for k, v in f(params).items()} for name, f in forms.items()}
  if got["sets"] != got["top_k"]:
    raise AssertionError(f"ranking_metrics_from_sets and ranking_metrics disagree: {got}")
  print(f"ML-100K Recall/NDCG@20 by form: {got}", file=sys.stderr)
  return forms, sets_s


def metric_cpu_ab(rounds):
  """One-thread CPU time (and wall) of the ML-100K metric call, the two forms interleaved, plus scores alone.

  Runs in a process pinned to one core with a one-thread XLA (`main` re-executes itself so).
  """
  split = movielens.temporal_split(movielens.read_inter(ml100k_path()), 10)
  n_train = split["train_users"].size
  _, holder = bpr_epoch_jax(split, 2048, 64, -(-n_train // 2048))
  params = holder["state"].params
  test, train = jnp.asarray(split["test_UxI"]), jnp.asarray(split["train_UxI"])
  forms, _ = ml100k_eval_forms(test, train, params)
  scores = jax.jit(lambda p, tr: jnp.where(tr, -jnp.inf, mf.mf_scores(p)))
  forms["scores_and_mask"] = lambda p: scores(p, train)
  for f in forms.values():
    jax.block_until_ready(f(params))
  cpu, wall = {n: [] for n in forms}, {n: [] for n in forms}
  for _ in range(rounds):
    for name, f in forms.items():
      t, c = time.perf_counter(), time.process_time()
      jax.block_until_ready(f(params))
      cpu[name].append(time.process_time() - c)
      wall[name].append(time.perf_counter() - t)
  res = {}
  for name in forms:
    res[f"ml100k_metric_cpu_ms_{name}"] = 1e3 * median(cpu[name])
    res[f"ml100k_metric_wall_ms_{name}"] = 1e3 * median(wall[name])
  res["ml100k_metric_cpu_speedup_sets_vs_top_k"] = median(cpu["top_k"]) / median(cpu["sets"])
  res["ml100k_metric_cpu_speedup_test_users_vs_top_k"] = median(cpu["top_k"]) / median(cpu["test_users"])
  res["rounds"] = rounds
  rel = split["test_UxI"] & ~split["train_UxI"]
  res["test_pairs"] = int(rel.sum())
  res["test_users"] = int(rel.any(1).sum())
  return res


ONE_THREAD = "--xla_cpu_multi_thread_eigen=false"  # with the one-core affinity: XLA runs on one thread


def main(argv):
  del argv
  if FLAGS.metric_cpu_ab and os.environ.get("JAXML_METRIC_AB") != "1":   # a pinned, one-thread process
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    env = {**os.environ, "JAXML_METRIC_AB": "1",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + ONE_THREAD).strip()}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  threads = pin_threads(FLAGS.threads) if not FLAGS.metric_cpu_ab else 1
  hostmem.relaunch_with_huge_pages()
  load_start = os.getloadavg()[0]
  if FLAGS.metric_cpu_ab:
    res = metric_cpu_ab(FLAGS.metric_cpu_ab)
    res["load_average_start"] = round(load_start, 2)
    res["load_average_end"] = round(os.getloadavg()[0], 2)
    print_results(res)
    return
  q = FLAGS.quick
  repeats = 2 if q else FLAGS.repeats
  res = {}
  n_users, n_items, dim, batch, spc = 943, 1682, 64, 4096, 50
  ranks = (4000, 8000, 64, 20, 256, 0.01) if q else (20000, 10000, 64, 20, 256, 0.01)   # chunk: PyTorch's
  res["threads"] = threads
  with PeerWorker(PEER, threads=threads) as peer:
    res.update({f"peer_{k}": v for k, v in peer.request("hello", threads=threads).items()})
    many, state_m, b_m = mf_ips_step(n_users, n_items, dim, batch, spc)
    one, state_1, b_1 = mf_ips_step(n_users, n_items, dim, batch, 1)
    nu, ni, d, k, chunk, dens = ranks
    rank = full_rank_jax(nu, ni, d, k, dens)
    jax_m, jax_1, torch_t, torch_r = [], [], [], []
    jax_r = {name: [] for name in rank}
    for _ in range(repeats):
      s, state_m = time_steps(many, state_m, b_m, 2)
      jax_m.append(s / spc)
      s, state_1 = time_steps(one, state_1, b_1, 50)
      jax_1.append(s)
      torch_t.append(median(peer.request("mf_ips_train", n_users=n_users, n_items=n_items, dim=dim, batch=batch,
                                         steps=50)["seconds"]))
      for name, f in rank.items():
        t = time.perf_counter()
        jax.block_until_ready(f())
        jax_r[name].append(time.perf_counter() - t)
      torch_r.append(median(peer.request("full_rank", n_users=nu, n_items=ni, dim=d, k=k, chunk=chunk, density=dens,
                                         repeats=1)["seconds"]))
    res["mf_ips_train_examples_per_s_jaxml"] = batch / median(jax_m)
    res["mf_ips_train_examples_per_s_jaxml_1_step_per_call"] = batch / median(jax_1)
    res["mf_ips_train_examples_per_s_torch"] = batch / median(torch_t)
    res["mf_ips_train_speedup"] = median(torch_t) / median(jax_m)
    res["mf_ips_train_speedup_1_step_per_call"] = median(torch_t) / median(jax_1)
    res["full_rank_users_per_s_jaxml"] = nu / median(jax_r["kernel"])
    res["full_rank_users_per_s_jaxml_blocked_top_k"] = nu / median(jax_r["blocked"])
    res["full_rank_users_per_s_jaxml_plain_top_k"] = nu / median(jax_r["plain"])
    res["full_rank_users_per_s_floor_score_mask_max"] = (nu // 128 * 128) / median(jax_r["floor"])
    res["full_rank_users_per_s_torch"] = nu / median(torch_r)
    res["full_rank_speedup"] = median(torch_r) / median(jax_r["kernel"])
    res["full_rank_speedup_blocked_top_k"] = median(torch_r) / median(jax_r["blocked"])
    res["full_rank_speedup_plain_top_k"] = median(torch_r) / median(jax_r["plain"])
    res["full_rank_speedup_bound_floor"] = res["full_rank_users_per_s_floor_score_mask_max"] / res[
        "full_rank_users_per_s_torch"]

    path = ml100k_path()
    if FLAGS.recbole and path:
      split = movielens.temporal_split(movielens.read_inter(path), 10)
      n_train = split["train_users"].size
      steps = -(-n_train // 2048)
      epoch, holder = bpr_epoch_jax(split, 2048, 64, steps)
      test, train = jnp.asarray(split["test_UxI"]), jnp.asarray(split["train_UxI"])
      forms, sets_s = ml100k_eval_forms(test, train, holder["state"].params)
      rb = peer.request("recbole_build", data_path="", batch=2048, dim=64)
      peer.request("recbole_round")                                   # warm-up round
      jt_s, rb_t, rb_e, rb_m = [], [], [], {}
      je_s = {name: [] for name in forms}
      for _ in range(repeats):
        t = time.perf_counter()
        epoch()
        jt_s.append(time.perf_counter() - t)
        for name, f in forms.items():
          t = time.perf_counter()
          jax.block_until_ready(f(holder["state"].params))
          je_s[name].append(time.perf_counter() - t)
        r = peer.request("recbole_round")
        rb_t.append(r["train_seconds"])
        rb_e.append(r["eval_seconds"])
        rb_m = r["metrics"]
      res["ml100k_train_interactions_jaxml"] = n_train
      res["ml100k_train_interactions_recbole"] = rb["train_interactions"]
      res["bpr_epoch_s_jaxml"] = median(jt_s)
      res["bpr_epoch_s_recbole"] = median(rb_t)
      res["bpr_train_speedup_vs_recbole"] = median(rb_t) / median(jt_s)
      res["full_sort_eval_s_jaxml"] = median(je_s["sets"])
      res["full_sort_eval_s_jaxml_test_users"] = median(je_s["test_users"])
      res["full_sort_eval_s_jaxml_top_k"] = median(je_s["top_k"])
      res["full_sort_eval_s_recbole"] = median(rb_e)
      res["full_sort_eval_speedup_vs_recbole"] = median(rb_e) / median(je_s["sets"])
      res["full_sort_eval_speedup_vs_recbole_test_users"] = median(rb_e) / median(je_s["test_users"])
      res["full_sort_eval_speedup_vs_recbole_top_k"] = median(rb_e) / median(je_s["top_k"])
      res["ml100k_relevant_sets_host_s"] = sets_s
      res["recbole_recall@20_after_epochs"] = rb_m.get("recall@20", float("nan"))
    else:
      res["recbole"] = "skipped (no ML-100K in the peer environment or --norecbole)"
  res["rounds"] = repeats
  res["cpu_cores"] = os.cpu_count()
  res["load_average_start"] = round(load_start, 2)
  res["load_average_end"] = round(os.getloadavg()[0], 2)
  print_results(res)


if __name__ == "__main__":
  app.run(main)
