"""lpips_fast: a drop-in, faster LPIPS (Zhang et al., CVPR 2018) for PyTorch."""
from .model import LPIPS, lpips
from .weights import WeightsNotFound

__all__ = ["LPIPS", "lpips", "WeightsNotFound"]
__version__ = "0.1.0"
