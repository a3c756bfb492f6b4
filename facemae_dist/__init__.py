"""facemae-dist: distributed training toolkit for privacy-preserving face recognition (FaceMAE)."""

__version__ = "0.1.0"
