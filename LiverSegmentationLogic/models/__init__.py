"""What a model is: tasks, networks, weights + cards, and the registry of versions.

Enters: task files (``Resources/Tasks/*.json`` and the user's), model folders (``model.pt`` +
``model_card.json``). Leaves: :class:`tasks.Task`, :class:`preprocess_config.PreprocessConfig`,
the U-Net (:mod:`network`), :class:`model_files.LoadedModel` ready to run, and the registry's
answer to "which version of which model is active" (:mod:`catalog`, torch-free, so the panel and the
server's broker can list models before torch is imported). Builds on ``io`` only.
"""
