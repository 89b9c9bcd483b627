"""Stage 2 of the predictor's pipeline, **trace**: one training step of the read model, traced on fake tensors into a
:class:`~lightning_memopt.predictor.trace.timeline.Timeline`, the live bytes of activations, logits and gradients in
flight after every op (with DeepSpeed ZeRO-3's gathered parameters, op by op). Entry:
:func:`.timeline.step_timeline`; the step itself in :mod:`.step`, its accountant in :mod:`.tracker`, deep models at
reduced depth in :mod:`.synthesis` and :mod:`.expand`.
"""
