"""Baselines written in the LoFiT adapter format, so they are served and evaluated like LoFiT adapters.

* :mod:`lofit.baselines.iti`: Inference-Time Intervention (Li et al., 2023), ``lofit-baseline iti``.
* Random-heads LoFiT (the localisation ablation) is ``lofit-train --random-heads``.
"""
