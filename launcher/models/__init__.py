"""Models: the built-ins (mlp, cnn, gpt) and user models named by import path.

Deliberately empty: ``launcher.models.target`` must stay importable without torch (the
planner calls it before any process starts), so ``build_model`` lives in
``launcher.models.build`` and is imported from there.
"""
