"""APOLLO / APOLLO-Mini for trainer-plugins. The optimizer (plain torch) is in .optimizer."""

from .optimizer import APOLLO, apollo_param_groups, state_bytes

__version__ = "0.1.0"
__all__ = ["APOLLO", "apollo_param_groups", "state_bytes"]
