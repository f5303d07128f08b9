"""``dwlab bench``: speed and memory measured side by side in one run (see ``run.py``).

Parts: ``train`` (training step against torchvision's FCOS), ``loss`` (DW weights + loss
against a per-GT loop and the FCOS loss), ``eval`` (500-image COCO evaluation), ``data``
(loading vs training throughput) and ``sweep`` (concurrent vs sequential trials).
"""
