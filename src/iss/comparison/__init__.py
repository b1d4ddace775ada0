"""Reading the results: statistics over pretraining seeds (:mod:`~iss.comparison.stats`), the positive
control and the comparisons' verdict with a multiplicity adjustment (:mod:`~iss.comparison.verdict`), and the
results tables in the paper's layout (:mod:`~iss.comparison.tables`).
"""
