"""Stage 1 of the predictor's pipeline, **read**: the model argument (a module, a Hugging Face config, a preset, a Hub
id, a parameter count) read once into a :class:`~lightning_memopt.predictor.read.sources.Source`: what the model holds
(:class:`~lightning_memopt.predictor.read.reading.ModelReading`: every parameter with its dtype and whether it trains,
the buffers, the blocks) and the module the next stage traces. Entry: :func:`.sources.resolve_source`.

Nothing is imported here, so that the presets load without torch.
"""
