"""The checkpoint error, in a module without imports: entry points catch it before they import
megatron-core (dist_ckpt.py), so that bad flags are reported in seconds."""


class CheckpointError(RuntimeError):
    pass
