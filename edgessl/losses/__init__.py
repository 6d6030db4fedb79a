"""Losses: pure functions of tensors, one file each, shapes in the docstrings."""
from edgessl.losses.instance import instance_loss
from edgessl.losses.sqrtkl import sqrtkl_loss

__all__ = ["instance_loss", "sqrtkl_loss"]
