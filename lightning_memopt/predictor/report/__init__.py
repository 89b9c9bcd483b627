"""Stage 4 of the predictor's pipeline, **report**: the
:class:`~lightning_memopt.predictor.report.estimate.MemoryEstimate` of an accounted step (:func:`.report.report`).

Nothing is imported here, so that the estimate type loads without torch.
"""
