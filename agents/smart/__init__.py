"""SMART-style tokenized sim-agent policy (Wu et al., SMART, arXiv 2405.15677; sizes after Zhang et al., CAT-K,
arXiv 2412.05334), reimplemented in our own code: ``tokenizer`` (motion vocabulary and tokenizing), ``model``
(``SmartModel``, its config and training batch), ``agent`` (``SmartAgent``, registered as ``"smart"``).
The method is explained in docs/tokenized_policy.md."""

from agents.smart.agent import SmartAgent
from agents.smart.model import LABEL_SMOOTHING, PRETRAINED, SIZES, SmartConfig, SmartModel, TokenBatch

__all__ = ["LABEL_SMOOTHING", "PRETRAINED", "SIZES", "SmartAgent", "SmartConfig", "SmartModel", "TokenBatch"]
