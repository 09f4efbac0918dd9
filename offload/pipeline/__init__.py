"""The pipeline and front ends: the generation stages over the manager and a family's steps, ``VideoGenerator``
(the Python API), the CLI and video files. The only layer that picks a model family (through the registry)."""
