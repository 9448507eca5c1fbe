"""Federated FedAMoLE: expert assignment (RSEA), server and clients, baselines and engines (the simulation loop is
`fedamole.simulation.runner`)."""

from fedamole.fl.aggregation import expert_mean, mean_states, mean_tensors, random_scores
from fedamole.fl.algorithm import Algorithm
from fedamole.fl.baselines import BASELINES, LoRABaseline
from fedamole.fl.client import client_update, embedding_stats, extract_state, load_state
from fedamole.fl.dp import DP_MECHANISMS
from fedamole.fl.engine import ENGINES, Engine, SequentialEngine, client_seed, make_engine
from fedamole.fl.fdlora import FDLoRA
from fedamole.fl.fedamole_algo import ASSIGNMENTS, FedAMoLE
from fedamole.fl.prompt_baselines import PROMPT_BASELINES, PromptBaseline
from fedamole.fl.protocol import ClientResult, ClientTask, EmbeddingStats, FusionRequest
from fedamole.fl.rsea import assign_experts, check_feasible, score_matrix

__all__ = [
    "ASSIGNMENTS",
    "BASELINES",
    "DP_MECHANISMS",
    "ENGINES",
    "PROMPT_BASELINES",
    "Algorithm",
    "ClientResult",
    "ClientTask",
    "EmbeddingStats",
    "Engine",
    "FDLoRA",
    "FedAMoLE",
    "FusionRequest",
    "LoRABaseline",
    "PromptBaseline",
    "SequentialEngine",
    "assign_experts",
    "check_feasible",
    "client_seed",
    "client_update",
    "embedding_stats",
    "expert_mean",
    "extract_state",
    "load_state",
    "make_engine",
    "mean_states",
    "mean_tensors",
    "random_scores",
    "score_matrix",
]
