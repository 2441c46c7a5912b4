"""influence-store: influence scores for PyTorch models, kept in a store, turned into curation.

The public API is imported lazily so that ``influence-store --help`` does not load torch.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "Task": "task", "load_task": "task", "compute_scores": "scoring", "ScoreComputation": "scoring",
    "ScoreChunk": "scoring", "SIGN_CONVENTION": "scoring", "InfluenceStoreError": "errors",
    "Approximator": "approximators", "FreezingPolicy": "freezing", "TaskLoader": "task",
    "hookimpl": "hookspecs", "Store": "store", "execute_run": "runs", "ProposalRule": "curation",
    "RunSettings": "settings", "prepare_scores": "scoring",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'influence_store' has no attribute {name!r}")
