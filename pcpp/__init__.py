"""pcpp: ProxConnect++ binarization (Lu, Yu, Li, Partovi Nia, NeurIPS 2023). Pure torch."""

__version__ = "0.1.0"
