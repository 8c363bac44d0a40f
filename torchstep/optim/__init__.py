"""torchstep optimizers: every class is a real ``torch.optim.Optimizer``."""
from ._base import TorchstepOptimizer
from .adamp import AdamP, SGDP
from .classp import CLASSP
from .diffgrad import DiffGrad
from .lion import Lion
from .muon import SWAN, Muon, NorMuon, SinkGD
from .muon_variants import Lanton, MuonPP
from .sophia import SophiaG, SophiaH
from .spam import SPAM, StableSPAM
from .spectra import Spectra

__all__ = ["TorchstepOptimizer", "Lion", "AdamP", "SGDP", "DiffGrad", "SophiaG", "SophiaH",
           "SPAM", "StableSPAM", "CLASSP", "Muon", "NorMuon", "MuonPP", "Lanton", "SinkGD", "SWAN", "Spectra"]
