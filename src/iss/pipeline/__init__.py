"""The run over its stages: :class:`~iss.pipeline.run.Pipeline` (every stage of a config in its run folder,
the variants a run compares, ``run_all``), the time estimate said before a run (:mod:`~iss.pipeline.estimate`)
and what finished runs teach it (:mod:`~iss.pipeline.calibration`).
"""

from iss.pipeline.run import Pipeline

__all__ = ["Pipeline"]
