"""The NN-worker side of hybrid training: the staleness gate and the in-process pipeline.

The public, PERSIA-compatible entry points are :mod:`persia.ctx` and :mod:`persia.data`.
"""
