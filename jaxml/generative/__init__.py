"""GAN, VAE, toy multi-modal datasets, mode metrics and the mode-collapse study."""
from jaxml.generative import gan, vae
from jaxml.generative.metrics import mode_metrics
from jaxml.generative.toy import ToyDataset, get_dataset, grid25, mixture1d, ring8
from jaxml.generative.study import MODELS, METRICS, PUBLISHED, StudyConfig, format_table, run_study, train_and_sample
