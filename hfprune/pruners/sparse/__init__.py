"""The sparse pruners: weights set to zero inside unchanged shapes, with the masks kept.

`methods.py` holds the registered methods (Wanda, SparseGPT, magnitude), `base.py` their shared
plumbing (plan, ratio checks, the sequential calibration walk, masks), `ops.py` the pure tensor math of
each score and mask, and `report.py` what the prune report says about a sparse result.
"""
