"""What local workers need imported, imported once by their fork server (``local``), with Python's
cyclic garbage collector paused meanwhile, and what it imported then frozen out of its sight.

torch's import allocates a few hundred thousand objects, none of them garbage, and ~380 collections walk
them meanwhile: paused, it took 0.86–0.88 s instead of 1.02–1.06 (2 cores, four interleaved pairs), and
it is what a CPU run waits on before its first prediction. A run of efficientnet_lite0 over Imagenette's
3,925 images forked its workers 1.03–1.11 s after the command started instead of 1.27–1.36, and took
14.88 s instead of 15.10 (medians of four interleaved pairs). Turned back on, the collector's first
collection still walked all ~276,000 of them (~65 ms, before the server forked its first worker); frozen
(``gc.freeze``, meant for a server that forks) no collection looks at them, here or in a worker, where a
full collection would also write to every page holding them. Workers then forked 1.03 s after the command
instead of 1.12, and the run took 13.78 s instead of 13.91 (medians of five interleaved pairs).
"""

import gc

gc.disable()
try:
    import torch  # noqa: F401

    from . import inference  # noqa: F401
finally:
    gc.freeze()
    gc.enable()
