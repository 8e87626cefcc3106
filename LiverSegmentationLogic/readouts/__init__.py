"""What a segmentation measures: volumes, fat fraction, agreement, and the audit trail.

Enters: label arrays + geometry, optional PDFF map or Dixon pair, optional reference labels.
Leaves: per-structure readouts (mL, PDFF median/mean/IQR, lesion burden), segmentation metrics
(Dice, RAVD, ASSD, MSSD, Bland-Altman) and audit records with array hashes. Numpy / SimpleITK /
scipy only, no torch. Builds on ``io``.
"""
