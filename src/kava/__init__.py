"""kava: latent reasoning via compressed KV-cache distillation (KaVa) and its baselines."""

from kava.config import KavaConfig, load_config

__version__ = "0.1.0"
__all__ = ["KavaConfig", "LatentReasoner", "SolveResult", "load_config", "__version__"]


def __getattr__(name: str):
    # the API imports torch and transformers: only when asked for
    if name in ("LatentReasoner", "SolveResult"):
        from kava import api

        return getattr(api, name)
    raise AttributeError(f"module 'kava' has no attribute {name!r}")
