"""The ops' Triton kernels, each module with the launcher that runs its kernels on one chunk.

Every module here imports triton at its top, so nothing here is imported until an op has chosen its Triton path
(`_common.resolve_backend`): `import hscr_fast.kernels` must work where triton is not installed (macOS), and Triton
decides between compiling and interpreting (TRITON_INTERPRET) when a kernel is decorated, that is when its module is
imported, so a test that sets TRITON_INTERPRET at its own import time still gets the interpreter.
"""
