"""lpips_fast: a drop-in, faster LPIPS (Zhang et al., CVPR 2018) for PyTorch."""
from . import pretrained_networks
from .compat import (dssim, im2tensor, l2, load_image, normalize_tensor, np2tensor, print_network,
                     psnr, rgb2lab, spatial_average, tensor2im, tensor2np, tensor2tensorlab,
                     tensor2vec, tensorlab2tensor, upsample, voc_ap)
from .embed import Embedding, distance as embedding_distance
from .graphs import cuda_graphed
from .layers import BCERankingLoss, DSSIM, Dist2LogitLayer, FakeNet, L2
from .metric import LPIPSMetric
from .functional import lpips
from .model import LPIPS, NetLinLayer, ScalingLayer
from .pairwise import diversity, pairwise, pairwise_rows
from .temporal import TLPResult, TemporalLPIPS, tlp
from .weights import WeightsNotFound
from . import trainer
from .trainer import Trainer, score_2afc_dataset, score_jnd_dataset

pn = pretrained_networks  # the official package's alias (lpips.pn)

# The official top level (lpips 0.1.4's lpips/__init__.py and lpips/lpips.py), for
# `import lpips_fast as lpips`; then lpips_fast's own additions.
_OFFICIAL = ["LPIPS", "ScalingLayer", "NetLinLayer", "Dist2LogitLayer", "BCERankingLoss", "FakeNet",
            "L2", "DSSIM", "pretrained_networks", "pn", "normalize_tensor", "l2", "psnr", "dssim",
            "rgb2lab", "tensor2np", "np2tensor", "tensor2tensorlab", "tensorlab2tensor",
            "load_image", "tensor2im", "im2tensor", "tensor2vec", "voc_ap", "spatial_average",
            "upsample", "print_network", "Trainer", "score_2afc_dataset",
            "score_jnd_dataset", "trainer"]
__all__ = _OFFICIAL + ["lpips", "WeightsNotFound", "Embedding", "embedding_distance", "pairwise",
                      "pairwise_rows", "diversity", "cuda_graphed", "LPIPSMetric",
                      "tlp", "TemporalLPIPS", "TLPResult"]
__version__ = "0.1.0"
