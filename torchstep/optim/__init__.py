"""torchstep optimizers: every class is a real ``torch.optim.Optimizer`` built from update rules."""
from ._base import ElementwiseRule, Rule, TorchstepOptimizer
from .adadagrad import AdAdaGrad, AdAdaGradNorm
from .adamp import AdamP, SGDP
from .adamw import AdamW
from .classp import CLASSP
from .diffgrad import DiffGrad
from .fira import Fira
from .frugal import Frugal
from .galore import GaLore, ProjectedOptimizer, ProjectedRule
from .gradnormlorp import GradNormLoRP
from .hybrid import MatrixHybrid
from .lanton import Lanton
from .lion import Lion
from .lowrank import LowRankBase
from .matrix import MatrixRule
from .muon import Muon
from .muonpp import MuonPP
from .normuon import NorMuon
from .schedulefree import ScheduleFree, ScheduleFreeAdamW, ScheduleFreeSGD
from .sinkgd import SinkGD
from .sophia import SophiaG, SophiaH
from .spam import SPAM, StableSPAM
from .spectra import Spectra
from .swan import SWAN
from .wrapper import OptimizerWrapper

__all__ = ["TorchstepOptimizer", "Rule", "ElementwiseRule", "MatrixRule", "MatrixHybrid", "OptimizerWrapper",
           "AdamW", "Lion", "AdamP", "SGDP", "DiffGrad", "SophiaG", "SophiaH", "SPAM", "StableSPAM", "CLASSP", "Muon",
           "NorMuon", "MuonPP", "Lanton", "SinkGD", "SWAN", "Spectra", "GaLore", "Fira", "Frugal", "GradNormLoRP",
           "ProjectedOptimizer", "ProjectedRule", "LowRankBase",
           "ScheduleFree", "ScheduleFreeAdamW", "ScheduleFreeSGD", "AdAdaGradNorm", "AdAdaGrad"]
