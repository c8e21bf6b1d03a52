"""Standard circuit structures: each builder returns the root node vector (one sum node)."""

from engine.structures.chow_liu import chow_liu_tree, pairwise_mutual_information
from engine.structures.hclt import hclt, hclt_from_tree
from engine.structures.hmm import hmm
from engine.structures.pd import pd
from engine.structures.rat_spn import rat_spn

__all__ = ["chow_liu_tree", "hclt", "hclt_from_tree", "hmm", "pairwise_mutual_information", "pd", "rat_spn"]
