"""lpips_fast: a drop-in, faster LPIPS (Zhang et al., CVPR 2018) for PyTorch."""
from .compat import im2tensor, load_image, tensor2im
from .embed import Embedding, distance as embedding_distance
from .graphs import cuda_graphed
from .metric import LPIPSMetric
from .functional import lpips
from .model import LPIPS
from .pairwise import diversity, pairwise, pairwise_rows
from .weights import WeightsNotFound

__all__ = ["LPIPS", "lpips", "WeightsNotFound", "Embedding", "embedding_distance", "pairwise",
           "pairwise_rows", "diversity", "cuda_graphed", "LPIPSMetric", "load_image", "im2tensor",
           "tensor2im"]
__version__ = "0.1.0"
