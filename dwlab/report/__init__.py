"""``dwlab report``: the paper's tables and figures rebuilt from the sweeps' MLflow runs.

Modules: ``load`` (MLflow -> pandas), ``tables`` (seed aggregation, the paper's layouts,
agreement), ``markdown`` (cells and tables), ``figures`` (PNGs), ``build`` (``build_report``).
"""

from dwlab.report.build import Report, build_report

__all__ = ["Report", "build_report"]
