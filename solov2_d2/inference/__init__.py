"""Inference: from the heads' outputs to detectron2 ``Instances``.

* :mod:`.pipeline`: the paper's steps for a batch (`SOLOv2PostProcessor`);
* :mod:`.masks`: the candidate masks as the pipeline reaches them, and their plain computation;
* :mod:`.matrix_nms`: Matrix NMS, public and used by the pipeline;
* :mod:`.cpu`: the CPU's faster computation of the same masks, behind the interface of
  :class:`.masks.CandidateMasks`.
"""
