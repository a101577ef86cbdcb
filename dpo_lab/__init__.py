"""dpo-lab: teaching and reproduction kit for Direct Preference Optimization (Rafailov et al., 2023)."""

__version__ = "0.1.0"
