"""dwlab: Dual Weighting label assignment (Li et al., CVPR 2022) on FCOS, and an ablation platform."""

__version__ = "0.1.0"

#: What a run computes for a given config, as a number: bumped by a change that makes the same
#: config and seed train to different numbers, so that sweeps neither skip, copy nor resume a run
#: of an earlier revision (it is part of ``sweep.spec.config_hash``) and ``dwlab report`` keeps
#: each table's latest revision. 2: data-loader workers restart every epoch (a resumed run now
#: trains as the straight one; runs with workers train on other flips from epoch 2 than in 1).
TRAINING_REVISION = 2
