"""esam-timm: Efficient Sharpness-Aware Minimization (ESAM, Du et al., ICLR 2022) for timm."""
__version__ = '0.1.0'
