"""From labelled cases to a new model version: training and fine-tuning.

Enters: datasets (nnU-Net or flat), a task, or a base model + the fine-tuning queue. Inside:
patient-wise splits, augmentation, the training loop (:mod:`trainer`), per-class validation.
Leaves: a versioned model (weights + card) in the registry, activated only when it passes its
checks (:mod:`task_training` for a task, :mod:`finetuning` for a study's corrections).
Builds on ``io``, ``models``, ``readouts``, ``inference``, ``studies``.
"""
