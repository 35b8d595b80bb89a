"""A language with a known answer: a first-order Markov chain, a token-sum reward, its exact KL-regularised optimum.

The language. Tokens `0 .. K-1` are content, `K` is EOS (vocabulary `K + 1`);
a response `y = (y_1, ..., y_n)` is generated after a one-token prompt (EOS
itself, as GPT-2 uses its end-of-text token as beginning-of-text) by

    y_t ~ P(. | y_{t-1}),   y_0 = EOS (the start state),

stopping after the first EOS or after `L = max_len` tokens (truncated without
EOS). `P` is a `[K + 1, K + 1]` matrix: row `s < K` after content token `s`,
row `K` the start; column `K` is the probability of stopping. A Llama with
vocabulary `K + 1` generating `L` new tokens with `eos_id = K` after the prompt
`[K]` (`jaxml.llama.generate_arrays`) has the same sequence space: every
sequence it can emit is one of `enumerate_sequences(K, L)`, and
`sum_y pi(y) = 1` over them exactly.

The reward is a sum over tokens, `r(y) = sum_{t <= n} f(y_t)` (`f` has `K + 1`
entries, EOS's included), so the KL-regularised optimum

    pi*_beta(y) = pi_ref(y) exp(r(y) / beta) / Z_beta

is the best trade-off of E_pi[r] against KL(pi || pi_ref): it maximises
`E_pi[r] - beta KL(pi || pi_ref)` (Gibbs' variational principle), and as beta
goes from infinity to 0 its points `(KL(pi*_beta || pi_ref), E_{pi*_beta}[r])`
trace the frontier: no policy has more reward at the same KL. The frontier is
increasing and concave in KL (its slope is `beta`, which falls as KL grows).

Two exact ways to compute it:

  * Markov reference (soft value iteration; a backward recursion over
    positions t = L-1, ..., 0, with the state the previous token):

        V_L(s) = 0,   V_{t+1}(EOS) = 0 (terminal)
        V_t(s) = beta log sum_a P(a|s) exp((f(a) + V_{t+1}(a)) / beta)
        pi*_t(a|s) = P(a|s) exp((f(a) + V_{t+1}(a) - V_t(s)) / beta)

    (`soft_value_iteration`, `markov_optimum`): the optimum is a
    position-dependent Markov chain and `V_0(start) = beta log Z_beta =
    E_{pi*}[r] - beta KL(pi* || P)`.
  * Any reference whose sequence log-probabilities are known, e.g. a trained
    Llama, which is not a Markov chain in general: enumerate the
    `sum_{n<L} K^n + K^L` sequences, score each (`llama.sequence_logprobs`),
    and tilt (`tilt`, `reward_and_kl`, `frontier`). This is the frontier for
    the reference the methods are actually regularised towards (the SFT
    policy); the Markov recursion gives the frontier for the data's chain,
    which the SFT policy only approximates. The two agree exactly when the
    reference is the chain (tested).

Preferences. Pairs `(y1, y2)` drawn independently from a policy are labelled
by Bradley-Terry on the true reward, `P(y1 > y2) = sigmoid((r1 - r2) / s)`
(`bradley_terry_labels`). The Bayes-optimal classifier prefers the higher
reward; its accuracy on fresh pairs is `E[sigmoid(|r1 - r2| / s)]`
(`bayes_accuracy`; ties count 1/2), the ceiling for any reward model's
held-out accuracy.

Exact maths runs in NumPy float64; sampling (`sample`) in JAX.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
  m = np.max(x, axis=axis, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
  return np.squeeze(out, axis)


def _check_beta(beta) -> float:
  beta = float(beta)
  if not (np.isfinite(beta) and beta > 0):
    raise ValueError(f"beta must be a finite number > 0, got {beta}")
  return beta


@dataclasses.dataclass(frozen=True, eq=False)
class MarkovLanguage:
  """A first-order Markov language (module docstring).

  Attributes:
    trans: `[K + 1, K + 1]` float64 rows summing to 1: `trans[s, a] = P(a | s)`,
      `s = K` the start state, `a = K` EOS.
    max_len: L, the most tokens a response has.
  """
  trans: np.ndarray
  max_len: int

  def __post_init__(self):
    t = np.asarray(self.trans, np.float64)
    if t.ndim != 2 or t.shape[0] != t.shape[1] or t.shape[0] < 2:
      raise ValueError(f"trans must be a square [K + 1, K + 1] matrix with K >= 1, got shape {t.shape}")
    if np.any(t < 0) or not np.allclose(t.sum(1), 1.0, atol=1e-9):
      raise ValueError("trans must have non-negative rows that sum to 1")
    if int(self.max_len) < 1:
      raise ValueError(f"max_len must be >= 1, got {self.max_len}")
    object.__setattr__(self, "trans", t)

  @property
  def num_tokens(self) -> int:
    """K, the number of content tokens."""
    return self.trans.shape[0] - 1

  @property
  def eos_id(self) -> int:
    return self.num_tokens

  @property
  def vocab_size(self) -> int:
    return self.num_tokens + 1

  @property
  def log_trans(self) -> np.ndarray:
    with np.errstate(divide="ignore"):
      return np.log(self.trans)


def make_language(seed: int, num_tokens: int, max_len: int, *, eos_prob: float = 0.2,
                  concentration: float = 1.0, start_eos_prob: float = 0.0) -> MarkovLanguage:
  """A random Markov language: Dirichlet(concentration) rows over the content tokens.

  Args:
    seed: NumPy seed.
    num_tokens: K content tokens.
    max_len: L.
    eos_prob: P(EOS | content token) (the same for every row), in [0, 1).
    concentration: the Dirichlet concentration (small: peaked rows).
    start_eos_prob: P(EOS | start): the probability of an empty response.

  Returns:
    The `MarkovLanguage`.
  """
  if not 0.0 <= eos_prob < 1.0 or not 0.0 <= start_eos_prob < 1.0:
    raise ValueError(f"eos_prob and start_eos_prob must lie in [0, 1), got {eos_prob}, {start_eos_prob}")
  if concentration <= 0:
    raise ValueError(f"concentration must be > 0, got {concentration}")
  rng = np.random.default_rng(seed)
  content = rng.dirichlet(np.full(num_tokens, concentration), size=num_tokens + 1)
  stop = np.full((num_tokens + 1, 1), eos_prob)
  stop[num_tokens] = start_eos_prob
  return MarkovLanguage(np.concatenate([content * (1.0 - stop), stop], axis=1), max_len)


def sample(lang: MarkovLanguage, rng: Array, n: int) -> tuple[Array, Array]:
  """Draws `n` responses from the chain (jit-able: the chain is a constant).

  Returns:
    `(tokens_NxL, lengths_N)`: int32 tokens, EOS after each response's end;
    lengths count the tokens up to and including the first EOS (L without one).
  """
  log_p = jnp.asarray(np.where(lang.trans > 0, lang.log_trans, -1e30), jnp.float32)
  eos = lang.eos_id

  def step(carry, key):
    prev, done = carry
    tok = jax.random.categorical(key, log_p[prev], axis=-1).astype(jnp.int32)
    tok = jnp.where(done, eos, tok)
    return (tok, done | (tok == eos)), (tok, done)

  start = (jnp.full((n,), eos, jnp.int32), jnp.zeros((n,), bool))
  _, (tokens, was_done) = jax.lax.scan(step, start, jax.random.split(rng, lang.max_len))
  lengths = jnp.sum(~was_done, axis=0).astype(jnp.int32)
  return tokens.T, lengths


def enumerate_sequences(num_tokens: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Every response: `n - 1` content tokens then EOS (n = 1..L), and the L-token ones without EOS.

  Returns:
    `(tokens_SxL, lengths_S)`, int32, EOS after each end; S = sum_{n<L} K^n + K^L.
  """
  k, eos = int(num_tokens), int(num_tokens)
  rows, lengths = [], []
  for n in range(max_len + 1):
    grid = np.stack(np.meshgrid(*([np.arange(k)] * n), indexing="ij"), -1).reshape(-1, n) if n else np.zeros((1, 0))
    body = np.full((grid.shape[0], max_len), eos, np.int32)
    body[:, :n] = grid
    rows.append(body)
    lengths.append(np.full(grid.shape[0], min(n + 1, max_len), np.int32))
  return np.concatenate(rows), np.concatenate(lengths)


def num_sequences(num_tokens: int, max_len: int) -> int:
  """S, the size of `enumerate_sequences(num_tokens, max_len)`."""
  return sum(num_tokens ** n for n in range(max_len)) + num_tokens ** max_len


def _valid(tokens, lengths) -> np.ndarray:
  return np.arange(np.shape(tokens)[1])[None, :] < np.asarray(lengths)[:, None]


def sequence_logprobs(lang: MarkovLanguage, tokens_SxL, lengths_S) -> np.ndarray:
  """`[S]` float64 log P(y) under the chain (-inf for an impossible sequence)."""
  tokens = np.asarray(tokens_SxL)
  prev = np.concatenate([np.full((tokens.shape[0], 1), lang.eos_id), tokens[:, :-1]], axis=1)
  lp = lang.log_trans[prev, tokens]
  return np.sum(np.where(_valid(tokens, lengths_S), lp, 0.0), axis=1)


def token_rewards(token_rewards_V, tokens_SxL, lengths_S) -> np.ndarray:
  """`[S]` float64 r(y) = sum over the response's tokens (EOS included) of f(y_t)."""
  f = np.asarray(token_rewards_V, np.float64)
  tokens = np.asarray(tokens_SxL)
  return np.sum(np.where(_valid(tokens, lengths_S), f[tokens], 0.0), axis=1)


def _check_rewards(lang: MarkovLanguage, f) -> np.ndarray:
  f = np.asarray(f, np.float64)
  if f.shape != (lang.vocab_size,):
    raise ValueError(f"token_rewards_V must have K + 1 = {lang.vocab_size} entries (EOS last), got shape {f.shape}")
  if not np.all(np.isfinite(f)):
    raise ValueError("token_rewards_V must be finite")
  return f


def soft_value_iteration(lang: MarkovLanguage, token_rewards_V, beta: float) -> tuple[np.ndarray, np.ndarray]:
  """The backward recursion of the module docstring.

  Returns:
    `(values_TxS, log_policy_LxSxA)`: `values[t, s]` = V_t(s) for t = 0..L
    (`[L + 1, K + 1]`), `log_policy[t, s, a]` = log pi*_t(a | s) (`[L, K + 1, K + 1]`).
  """
  beta = _check_beta(beta)
  f = _check_rewards(lang, token_rewards_V)
  L, V = lang.max_len, lang.vocab_size
  log_p = lang.log_trans
  values = np.zeros((L + 1, V))
  log_pi = np.zeros((L, V, V))
  for t in range(L - 1, -1, -1):
    cont = values[t + 1].copy()
    cont[lang.eos_id] = 0.0                                   # EOS ends the response
    logits = log_p + ((f + cont) / beta)[None, :]             # [s, a]
    lse = _logsumexp(logits, axis=1)
    values[t] = beta * lse
    log_pi[t] = logits - lse[:, None]
  return values, log_pi


def markov_optimum(lang: MarkovLanguage, token_rewards_V, beta: float) -> dict[str, float]:
  """E[r], KL(pi*_beta || P) and V_0(start) of the optimum under the chain as reference.

  A forward pass of the occupancy `d_t(s)` (the probability that t tokens
  were emitted, none of them EOS, the last being s) through pi*_t.
  """
  f = _check_rewards(lang, token_rewards_V)
  values, log_pi = soft_value_iteration(lang, f, beta)
  log_p = lang.log_trans
  d = np.zeros(lang.vocab_size)
  d[lang.eos_id] = 1.0                                         # the start state
  reward = kl = 0.0
  for t in range(lang.max_len):
    pi = np.exp(log_pi[t])
    joint = d[:, None] * pi
    reward += float(np.sum(joint * f[None, :]))
    with np.errstate(invalid="ignore"):
      kl += float(np.sum(np.where(joint > 0, joint * (log_pi[t] - log_p), 0.0)))
    d = joint.sum(0)
    d[lang.eos_id] = 0.0
  return {"reward": reward, "kl": kl, "value": float(values[0, lang.eos_id])}


def tilt(logp_ref_S, rewards_S, beta: float) -> np.ndarray:
  """`[S]` log pi*_beta(y) = log pi_ref(y) + r(y) / beta - log Z_beta over an enumerated support."""
  beta = _check_beta(beta)
  x = np.asarray(logp_ref_S, np.float64) + np.asarray(rewards_S, np.float64) / beta
  return x - _logsumexp(x, axis=0)


def reward_and_kl(logp_S, logp_ref_S, rewards_S) -> tuple[float, float]:
  """Exact `(E_pi[r], KL(pi || pi_ref))` of a distribution given on an enumerated support.

  `logp_S` must cover the support (its probabilities sum to 1; renormalised
  here against float32 rounding of a model's log-probs).
  """
  lp = np.asarray(logp_S, np.float64)
  lref = np.asarray(logp_ref_S, np.float64)
  if lp.shape != lref.shape or lp.shape != np.shape(rewards_S):
    raise ValueError(f"logp_S, logp_ref_S and rewards_S must have one shape, got {lp.shape}, {lref.shape}, "
                     f"{np.shape(rewards_S)}")
  lp = lp - _logsumexp(lp, axis=0)
  p = np.exp(lp)
  with np.errstate(invalid="ignore"):
    kl = float(np.sum(np.where(p > 0, p * (lp - lref), 0.0)))
  return float(np.sum(p * np.asarray(rewards_S, np.float64))), kl


def frontier(logp_ref_S, rewards_S, betas) -> tuple[np.ndarray, np.ndarray]:
  """`(rewards, kls)` of pi*_beta for each beta, by enumeration."""
  out = [reward_and_kl(tilt(logp_ref_S, rewards_S, b), logp_ref_S, rewards_S) for b in betas]
  return np.asarray([o[0] for o in out]), np.asarray([o[1] for o in out])


def markov_frontier(lang: MarkovLanguage, token_rewards_V, betas) -> tuple[np.ndarray, np.ndarray]:
  """`(rewards, kls)` of pi*_beta for each beta, by the backward recursion (the chain as reference)."""
  out = [markov_optimum(lang, token_rewards_V, b) for b in betas]
  return np.asarray([o["reward"] for o in out]), np.asarray([o["kl"] for o in out])


def frontier_reward_at(kl: float, stats: Callable[[float], tuple[float, float]], *, beta_min: float = 1e-3,
                       beta_max: float = 1e4, iters: int = 80) -> float:
  """The frontier's reward at a given KL: bisection on log beta (KL falls as beta grows).

  Args:
    kl: the KL budget (a method's KL); <= 0 gives the reference's reward,
      beyond the KL at `beta_min` the reward there (the frontier is flat
      once all mass is on the best sequences).
    stats: `stats(beta) -> (reward, kl)` of pi*_beta (e.g. a partial of
      `reward_and_kl(tilt(...))` or `markov_optimum`).

  Returns:
    The largest reward any policy reaches with KL(pi || pi_ref) <= kl.
  """
  r_hi, kl_hi = stats(beta_min)
  if kl >= kl_hi:
    return r_hi
  r_lo, kl_lo = stats(beta_max)
  if kl <= kl_lo:
    return r_lo
  lo, hi = np.log(beta_min), np.log(beta_max)               # KL(lo) > kl > KL(hi)
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    if stats(float(np.exp(mid)))[1] > kl:
      lo = mid
    else:
      hi = mid
  return stats(float(np.exp(hi)))[0]


def monte_carlo_reward_kl(rewards_N, logp_N, logp_ref_N) -> dict[str, float]:
  """E_pi[r] and KL(pi || pi_ref) from N samples of pi, with standard errors.

  KL by the k1 estimator `mean(log pi(y) - log pi_ref(y))` (unbiased, each
  term may be negative); standard errors `std / sqrt(N)` (ddof 1).
  """
  r = np.asarray(rewards_N, np.float64)
  k1 = np.asarray(logp_N, np.float64) - np.asarray(logp_ref_N, np.float64)
  if r.shape != k1.shape or r.ndim != 1 or r.size < 2:
    raise ValueError(f"rewards_N, logp_N and logp_ref_N must be [N] arrays with N >= 2, got {r.shape}, {k1.shape}")
  n = r.size
  return {"reward": float(r.mean()), "reward_se": float(r.std(ddof=1) / np.sqrt(n)),
          "kl": float(k1.mean()), "kl_se": float(k1.std(ddof=1) / np.sqrt(n)), "samples": n}


def bradley_terry_labels(rng: np.random.Generator, r1_N, r2_N, *, scale: float = 1.0) -> np.ndarray:
  """`[N]` bool: whether the first of each pair is preferred, with P = sigmoid((r1 - r2) / scale)."""
  if not (np.isfinite(scale) and scale > 0):
    raise ValueError(f"scale must be a finite number > 0, got {scale}")
  r1, r2 = np.asarray(r1_N, np.float64), np.asarray(r2_N, np.float64)
  if r1.shape != r2.shape:
    raise ValueError(f"r1_N and r2_N must have one shape, got {r1.shape} and {r2.shape}")
  p = 1.0 / (1.0 + np.exp(-(r1 - r2) / scale))
  return rng.random(r1.shape) < p


def bayes_accuracy(probs_S, rewards_S, *, scale: float = 1.0) -> float:
  """The Bayes-optimal preference accuracy on pairs drawn i.i.d. from `probs_S`: E[sigmoid(|r1 - r2| / scale)].

  Computed over the distinct reward values (a token-sum reward takes few).
  """
  p = np.asarray(probs_S, np.float64)
  r = np.round(np.asarray(rewards_S, np.float64), 12)
  values, inverse = np.unique(r, return_inverse=True)
  mass = np.bincount(inverse.ravel(), weights=p.ravel(), minlength=values.size)
  mass = mass / mass.sum()
  gap = np.abs(values[:, None] - values[None, :]) / scale
  return float(np.sum(mass[:, None] * mass[None, :] / (1.0 + np.exp(-gap))))


def expected_accuracy(probs_S, rewards_S, scores_S, *, scale: float = 1.0, chunk: int = 1024) -> float:
  """A scorer's exact expected accuracy on fresh Bradley-Terry pairs drawn i.i.d. from `probs_S`.

  `E[sigmoid(d / scale) 1(s1 > s2) + sigmoid(-d / scale) 1(s2 > s1) + 1(s1 = s2) / 2]`, d = r1 - r2: the
  probability that the scorer ranks the labelled-chosen response first (ties: a coin).
  """
  p = np.asarray(probs_S, np.float64)
  p = p / p.sum()
  r, s = np.asarray(rewards_S, np.float64), np.asarray(scores_S, np.float64)
  total = 0.0
  for i in range(0, p.size, chunk):
    d = (r[i:i + chunk, None] - r[None, :]) / scale
    win = 1.0 / (1.0 + np.exp(-d))                          # P(first preferred)
    ds = s[i:i + chunk, None] - s[None, :]
    right = np.where(ds > 0, win, np.where(ds < 0, 1.0 - win, 0.5))
    total += float(np.sum(p[i:i + chunk, None] * p[None, :] * right))
  return total
