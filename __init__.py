"""Video Offload: run Wan2.1 video diffusion transformers on GPUs too small to hold them, inside ComfyUI or not."""

# ComfyUI (custom_nodes/<folder>) and `import video_offload` load this file as a package. pytest also imports it,
# as a lone module without a package, when the checkout's folder name is not a Python identifier; then there is
# nothing to export.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .offload import OffloadConfig, VideoGenerator

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "OffloadConfig", "VideoGenerator"]
