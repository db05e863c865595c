"""LGM, the reconstruction module of Ouroboros3D, with its zero-initialised time embedding."""

from model.lgm.config import LGMConfig
from model.lgm.inputs import prepare_inputs
from model.lgm.loss import reconstruction_loss
from model.lgm.model import LGM, activate_gaussians

__all__ = ["LGM", "LGMConfig", "activate_gaussians", "prepare_inputs", "reconstruction_loss"]
