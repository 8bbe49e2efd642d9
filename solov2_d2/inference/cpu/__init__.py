"""The CPU's faster computation of the candidate masks, with the plain results
(`CPUCandidateMasks`, the only name the rest of the package uses):

* :mod:`.blocks`: the grid of pixel blocks, its limits, block bounds, grouped products;
* :mod:`.block_masks`: scoring, intersections and kept probabilities block by block;
* :mod:`.cropped_paste`: pasting around each mask's pixels near the threshold.
"""
from .block_masks import CPUCandidateMasks

__all__ = ["CPUCandidateMasks"]
