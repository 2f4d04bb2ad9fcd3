"""kava: latent reasoning via compressed KV-cache distillation (KaVa) and its baselines."""

from kava.config import KavaConfig, load_config

__version__ = "0.1.0"
__all__ = ["KavaConfig", "load_config", "__version__"]
