"""dwlab: Dual Weighting label assignment (Li et al., CVPR 2022) on FCOS, and an ablation platform."""

__version__ = "0.1.0"
