"""CTR towers: features, interaction modules (DCN-v2, DLRM, LCE, DHEN, ...), towers, losses, metrics.

Modules: `config` (FeatureConfig, TowerConfig), `features`, `modules`, `towers`,
`losses`, `metrics`, `simulator`, `criteo`, `train` (TrainConfig, loss_fn, batches,
RECSYS_RULES, predict, evaluate), `experiment` (`run(config, workdir)`, `train_tower`),
`causal` (debiasing: IPS/SNIPS/DR risks, propensity models, a simulator with known truth,
Coat, MF and MF-IPS, ranking metrics).
Training runs on `jaxml.train`.
"""
from jaxml.recsys import causal, config, criteo, features, losses, metrics, modules, simulator, towers, train  # noqa: F401
from jaxml.recsys.config import FeatureConfig, TowerConfig, pyramid_widths  # noqa: F401
from jaxml.recsys.train import RECSYS_RULES, TrainConfig  # noqa: F401
