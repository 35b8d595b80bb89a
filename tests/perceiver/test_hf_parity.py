"""Parity of jaxml's Perceiver with transformers' (peer env, torch CPU, float32).

Random tiny `PerceiverForMaskedLM`s and `PerceiverForImageClassificationFourier`s
(several latent counts, head counts, qk/v widths, query residual on and off,
both GELU forms, padded inputs) are built, seeded and saved by the peer;
jaxml imports them with `from_hf` and must reproduce transformers' logits
within 1e-4 at the non-padded positions. Each imported model is written back
with `to_hf`; transformers must load it with no missing or unexpected keys
and reproduce jaxml's logits within 1e-4. The byte ids of `text_to_ids` must
equal `PerceiverTokenizer`'s. The peer process starts twice (module fixtures).
"""
import jax
import numpy as np
import pytest

from jaxml import perceiver
from tests import peer

pytestmark = pytest.mark.xdist_group("test_perceiver_hf_parity")  # one worker per module: its peer fixture starts once

TOL = 1e-4
# transformers PerceiverConfig kwargs; "batch" is (B, M) for byte ids, (B, H, W) for images; "pad" masks
# the last `pad` positions (pixels, in raster order) of the last example.
SPECS = [
    dict(name="mlm_small", arch="masked_lm", seed=1, batch=(2, 24), pad=5,
         config=dict(num_latents=8, d_latents=32, d_model=16, num_blocks=1, num_self_attends_per_block=2,
                     num_self_attention_heads=2, num_cross_attention_heads=2, max_position_embeddings=24,
                     use_query_residual=True)),
    dict(name="mlm_qk_v_no_residual", arch="masked_lm", seed=2, batch=(2, 16), pad=3,
         config=dict(num_latents=5, d_latents=24, d_model=32, num_blocks=2, num_self_attends_per_block=1,
                     num_self_attention_heads=3, num_cross_attention_heads=4, qk_channels=12, v_channels=24,
                     cross_attention_widening_factor=2, self_attention_widening_factor=3,
                     max_position_embeddings=20, use_query_residual=False)),
    dict(name="mlm_shape_q_tanh", arch="masked_lm", seed=3, batch=(3, 12), pad=0,
         config=dict(num_latents=12, d_latents=16, d_model=8, num_blocks=1, num_self_attends_per_block=3,
                     num_self_attention_heads=4, num_cross_attention_heads=2, cross_attention_shape_for_attention="q",
                     hidden_act="gelu_new", max_position_embeddings=12)),
    dict(name="fourier_small", arch="fourier", seed=4, batch=(2, 5, 6), pad=0,
         config=dict(num_latents=4, d_latents=16, num_blocks=1, num_self_attends_per_block=1,
                     num_self_attention_heads=2, num_cross_attention_heads=1, num_labels=5)),
    dict(name="fourier_qk_v_no_residual", arch="fourier", seed=5, batch=(2, 4, 4), pad=4,
         config=dict(num_latents=7, d_latents=24, num_blocks=2, num_self_attends_per_block=2,
                     num_self_attention_heads=4, num_cross_attention_heads=3, qk_channels=12, v_channels=24,
                     cross_attention_widening_factor=2, self_attention_widening_factor=2, use_query_residual=False,
                     num_labels=3)),
]
NAMES = [s["name"] for s in SPECS]
TEXTS = ["hello", "Perceiver IO: é€ 漢字\n"]


def _inputs(spec):
  """(inputs, mask or None) of a spec: byte ids [B, M] or images [B, H, W, 3]; seeded."""
  rng = np.random.default_rng(100 + spec["seed"])
  if spec["arch"] == "masked_lm":
    x = rng.integers(0, 262, size=spec["batch"]).astype(np.int32)
  else:
    x = rng.uniform(-1.0, 1.0, size=(*spec["batch"], 3)).astype(np.float32)
  if not spec["pad"]:
    return x, None
  B, M = spec["batch"][0], int(np.prod(spec["batch"][1:]))
  mask = np.ones((B, M), np.int32)
  mask[-1, M - spec["pad"]:] = 0
  return x, mask


def _feed(prefix, spec):
  x, mask = _inputs(spec)
  out = {f"{prefix}/inputs": x}
  if mask is not None:
    out[f"{prefix}/mask"] = mask
  return out


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _compare(spec, jaxml_logits, hf_logits):
  """Max |difference| over the positions both models define (masked LM: the M inputs, not padding)."""
  _, mask = _inputs(spec)
  if spec["arch"] == "fourier":
    return _max_diff(jaxml_logits, hf_logits)
  M = jaxml_logits.shape[1]
  hf = np.asarray(hf_logits)[:, :M]  # transformers always decodes max_position_embeddings queries
  keep = np.ones(jaxml_logits.shape[:2], bool) if mask is None else mask.astype(bool)
  return _max_diff(np.asarray(jaxml_logits)[keep], hf[keep])


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  inputs = {}
  for s in SPECS:
    inputs.update(_feed(s["name"], s))
  build = [{k: s[k] for k in ("name", "arch", "seed", "config")} for s in SPECS]
  return peer.run("hf_perceiver", inputs, workdir=str(tmp_path_factory.mktemp("hf_perceiver")), build=build,
                  texts=TEXTS)


@pytest.fixture(scope="module")
def imported(ref):
  return {s["name"]: perceiver.from_hf(ref[f"{s['name']}/folder"]) for s in SPECS}


_apply = jax.jit(perceiver.apply, static_argnums=2)  # one compile per config, shared by import and export


def _jaxml_logits(cfg, params, spec):
  x, mask = _inputs(spec)
  return np.asarray(_apply(params, x, cfg, input_mask=mask))


@pytest.mark.parametrize("name", NAMES)
def test_from_hf_logits_match(name, ref, imported):
  spec = next(s for s in SPECS if s["name"] == name)
  cfg, params = imported[name]
  c = spec["config"]
  assert (cfg.num_latents, cfg.d_latents, cfg.num_cross_attention_heads, cfg.num_self_attention_heads) == (
      c["num_latents"], c["d_latents"], c["num_cross_attention_heads"], c["num_self_attention_heads"])
  assert cfg.use_query_residual == c.get("use_query_residual", True)
  assert cfg.gelu == ("tanh" if c.get("hidden_act") == "gelu_new" else "exact")
  if spec["arch"] == "fourier":
    assert (cfg.task, cfg.d_model, cfg.num_classes) == ("classifier", 261, c["num_labels"])
  else:
    assert cfg.task == "masked_lm" and cfg.decoder_configs[0].qk_channels == 256
  logits = _jaxml_logits(cfg, params, spec)
  hf = ref[f"{name}/logits"]
  assert np.std(hf) > 0.1  # the random weights give logits that differ across classes / bytes
  diff = _compare(spec, logits, hf)
  print(f"from_hf {name}: max |logit diff| = {diff:.2e} (logit std {np.std(hf):.2f})")
  assert diff < TOL, f"{name}: jaxml vs transformers logits differ by {diff}"


@pytest.fixture(scope="module")
def exported(imported, tmp_path_factory):
  """Every imported model written back with to_hf and loaded by transformers (one peer run)."""
  root = tmp_path_factory.mktemp("perceiver_to_hf")
  inputs, load, logits = {}, [], []
  for i, s in enumerate(SPECS):
    cfg, params = imported[s["name"]]
    folder = perceiver.to_hf(cfg, params, root / s["name"])
    load.append({"folder": str(folder), "arch": s["arch"]})
    inputs.update(_feed(f"load{i}", s))
    logits.append(_jaxml_logits(cfg, params, s))
  out = peer.run("hf_perceiver", inputs, workdir=str(root / "peer"), load=load)
  return logits, out


@pytest.mark.parametrize("i", range(len(SPECS)), ids=NAMES)
def test_to_hf_logits_reproduced_by_transformers(i, exported):
  logits, out = exported
  assert not out[f"load{i}/problems"], f"transformers loading {NAMES[i]}: {out[f'load{i}/problems']}"
  diff = _compare(SPECS[i], logits[i], out[f"load{i}/logits"])
  print(f"to_hf {NAMES[i]}: max |logit diff| = {diff:.2e}")
  assert diff < TOL, f"{NAMES[i]}: transformers' logits differ from jaxml's by {diff}"


def test_byte_ids_match_perceiver_tokenizer(ref):
  assert ref["texts/ids"] == [perceiver.text_to_ids(t).tolist() for t in TEXTS]
  assert ref["texts/special"] == {"pad": perceiver.PAD_ID, "bos": perceiver.BOS_ID, "eos": perceiver.EOS_ID,
                                  "mask": perceiver.MASK_ID, "cls": perceiver.CLS_ID, "sep": perceiver.SEP_ID}
  assert perceiver.ids_to_text(perceiver.text_to_ids(TEXTS[1])) == TEXTS[1]
