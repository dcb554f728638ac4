from madpo.modules.base import LoraOptions, OptimizerOptions, PairwiseModule
from madpo.modules.policy import PolicyLightningModule
from madpo.modules.reward import RewardLightningModule

__all__ = ["LoraOptions", "OptimizerOptions", "PairwiseModule", "PolicyLightningModule", "RewardLightningModule"]
