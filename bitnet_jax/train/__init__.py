"""Training: run configuration, the corpus of a run, the train step and loop, device meshes.

`run_config` (RunConfig: everything a run needs besides the model), `corpus` (a run's tokenizer
and tokenized corpus), `loop` (optimizer, train step, the training loop with its run folder,
checkpoints and metrics), `sharding` (logical axes -> a data / fsdp / tensor mesh).
"""
