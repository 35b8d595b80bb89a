"""DPO and IPO reach their closed-form optima on a one-step bandit with unlimited Bradley-Terry data.

A prompt followed by a single token y in {0..K-1}; pi = softmax(theta), pi_ref fixed. Pairs
(y, y') ~ mu x mu, labelled by Bradley-Terry on a true reward r: P(y > y') = sigmoid(r_y - r_y').
"Unlimited data" is the exact expectation over all K^2 ordered pairs. With g = log pi - log pi_ref:
  DPO (sigmoid):  g*(y) = r(y) / beta + c                           (DPO paper, Sec. 4)
  IPO:            g*(y) = E_{y'~mu} P(y > y') / beta + c            (IPO paper, Prop. 4, tau = beta)
The tolerance comes from the optimiser's end point: near a minimum of a smooth convex loss the
distance to it is at most |grad| / lambda_min (lambda_min: the smallest Hessian eigenvalue off
the constant direction, which the loss cannot see), computed at the end of training.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from jaxml import alignment

jax.config.update("jax_enable_x64", False)

K = 5
R = np.asarray([0.0, 1.0, -0.5, 2.0, 0.3])
PI_REF = np.asarray([0.3, 0.1, 0.2, 0.15, 0.25])
MU = np.full(K, 1.0 / K)


def population_loss(theta, loss_type, beta):
  logp = jax.nn.log_softmax(theta)
  ref = jnp.log(PI_REF)
  i, j = np.meshgrid(np.arange(K), np.arange(K), indexing="ij")
  i, j = i.ravel(), j.ravel()
  p_win = 1.0 / (1.0 + np.exp(-(R[i] - R[j])))
  weight = MU[i] * MU[j] * p_win                      # y_i chosen over y_j
  ones = jnp.ones(len(i))

  def one(a, b):
    loss, _ = alignment.dpo_loss(logp[a][None], logp[b][None], ref[a][None], ref[b][None], beta=beta,
                                 loss_type=loss_type, chosen_lengths_B=ones[:1], rejected_lengths_B=ones[:1])
    return loss

  losses = jax.vmap(one)(jnp.asarray(i), jnp.asarray(j))
  return jnp.sum(jnp.asarray(weight, jnp.float32) * losses)


def optimum(loss_type, beta):
  if loss_type == "sigmoid":
    return R / beta
  p = 1.0 / (1.0 + np.exp(-(R[:, None] - R[None, :])))
  return (p * MU[None, :]).sum(1) / beta


class BanditTest(parameterized.TestCase):

  @parameterized.parameters(("sigmoid", 1.0), ("sigmoid", 0.5), ("ipo", 1.0), ("ipo", 0.5))
  def test_reaches_the_closed_form_optimum(self, loss_type, beta):
    loss = jax.jit(lambda t: population_loss(t, loss_type, beta))
    tx = optax.adam(0.05)

    def body(carry, _):
      theta, opt = carry
      g = jax.grad(loss)(theta)
      upd, opt = tx.update(g, opt, theta)
      return (optax.apply_updates(theta, upd), opt), None

    theta0 = jnp.log(jnp.asarray(PI_REF, jnp.float32))     # start at the reference
    (theta, _), _ = jax.lax.scan(body, (theta0, tx.init(theta0)), None, length=4000)
    g = np.asarray(jax.nn.log_softmax(theta)) - np.log(PI_REF)
    want = optimum(loss_type, beta)
    dev = (g - g.mean()) - (want - want.mean())
    # Tolerance from the end point (module docstring).
    grad = np.asarray(jax.grad(loss)(theta), np.float64)
    hess = np.asarray(jax.hessian(loss)(theta), np.float64)
    eig = np.linalg.eigvalsh(hess)
    lam_min = eig[eig > 1e-6 * eig.max()].min()
    tol = 2.0 * np.linalg.norm(grad) / lam_min + 1e-4      # + float32 rounding of the log-probs
    self.assertLess(np.abs(dev).max(), tol, f"deviation {dev}, tolerance {tol}")
    self.assertLess(tol, 0.05)   # the check is not vacuous: training did converge
    # And the optimum is not the reference: the policy moved by the expected amount.
    self.assertGreater(np.ptp(want), 20 * tol)


if __name__ == "__main__":
  absltest.main()
