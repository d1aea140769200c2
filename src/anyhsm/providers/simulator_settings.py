"""The simulator's config checks (named by its registry spec): it holds keys in memory
with no protection, so it is for development and test networks only."""

from __future__ import annotations

from anyhsm.config import Config, Problem
from anyhsm.types import Environment, Network


def refusal(environment: Environment, network: Network) -> str | None:
    """Why the simulator may not run in this environment on this network, or None."""
    if environment is Environment.PRODUCTION or network is Network.MAINNET:
        return f"the simulator is refused in {environment.value} on {network.value}"
    return None


def config_problems(cfg: Config) -> list[Problem]:
    why = refusal(cfg.environment, cfg.network)
    if why is None or "simulator" not in cfg.fallback.chain:
        return []
    return [
        Problem(
            "fallback.chain",
            repr(list(cfg.fallback.chain)),
            why,
            "remove 'simulator' from the chain",
        )
    ]
