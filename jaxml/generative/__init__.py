"""GAN, VAE, toy multi-modal datasets, mode metrics and the mode-collapse study (`study.run`)."""
from jaxml.generative import gan, study, vae
from jaxml.generative.metrics import mode_metrics
from jaxml.generative.toy import ToyDataset, get_dataset, grid25, mixture1d, ring8
from jaxml.generative.study import MODELS, METRICS, PUBLISHED, StudyConfig, results_table, train_pair
