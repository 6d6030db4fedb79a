"""Losses: pure functions of tensors, one file each, shapes in the docstrings."""
from edgessl.losses.byol import byol_loss
from edgessl.losses.instance import instance_loss
from edgessl.losses.ntxent import ntxent_loss
from edgessl.losses.sqrtkl import sqrtkl_loss

__all__ = ["byol_loss", "instance_loss", "ntxent_loss", "sqrtkl_loss"]
