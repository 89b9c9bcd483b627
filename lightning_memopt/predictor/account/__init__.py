"""Stage 3 of the predictor's pipeline, **account**: what the engine (plain torch, DeepSpeed ZeRO 0-3, offload) keeps
per rank (:mod:`.model_states`) put beside every moment of the traced timeline, and what a CUDA device adds (the
caching allocator replayed, :mod:`.cuda_replay` and :mod:`.cuda_allocator`), into an
:class:`~lightning_memopt.predictor.account.accounting.Accounting` of the peak. Entry: :func:`.accounting.account`.
"""
