"""The CPU's faster computation of the candidate masks, with the plain results
(`CPUCandidateMasks`, the only name the rest of the package uses):

* :mod:`.block_masks`: scoring, intersections and kept probabilities block by block (the block
  grid, its bounds and the limits where it gives up);
* :mod:`.cropped_paste`: pasting around each mask's pixels near the threshold.
"""
from .block_masks import CPUCandidateMasks

__all__ = ["CPUCandidateMasks"]
