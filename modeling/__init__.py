"""Framework-free modeling core: generation backends, reward models, welfare functions.

Nothing in this package imports Django, so it can be unit-tested and reused on
GPU workers that do not run the web stack.
"""
