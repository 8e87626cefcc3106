"""Many cases at once: batch runs over a study, and the queue of corrected cases.

Enters: a folder (or list) of scans, or one reviewed case with its corrected labels. Leaves: a
segmentation + readout + audit record per case and one CSV for the study (:mod:`batch`); cases in
the fine-tuning queue in nnU-Net raw layout, committed atomically (:mod:`case_queue`).
Builds on ``io``, ``readouts``, ``inference``.
"""
