"""Multi-GPU inference: a model's DiTs sharded by FSDP2 over a torchrun worker group, with CFG/Ulysses parallelism.

``launcher`` (the pack's side: start, watch, stop, ``call``), ``protocol`` (the authenticated local link and the
spec), ``worker`` (the torchrun entry point, generic over model families), ``fsdp`` (mesh, FSDP2, CFG split,
Ulysses), ``shard_loading`` (each rank reads its own rows), ``sampling`` (the ``sample`` worker method). Nothing
heavy is imported here: the manager imports ``launcher`` when a run needs workers. Imports nothing from any family.
"""
