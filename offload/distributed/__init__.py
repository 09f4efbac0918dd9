"""Multi-GPU inference: the DiT sharded by FSDP2 over a torchrun worker group, with CFG/Ulysses parallel compute.

``launcher`` (the pack's side: start, watch, stop), ``protocol`` (the authenticated local link and the spec),
``worker`` (the torchrun entry point), ``parallel`` (mesh, FSDP2, CFG split, Ulysses), ``shard_loading`` (each rank
reads its own rows). Nothing heavy is imported here: the manager imports ``launcher`` when a run needs workers.
"""
