"""Operators that training and inference share: the deformable convolution of the DCN variants
and SOLOv2's dynamic (per-candidate) mask convolution."""
