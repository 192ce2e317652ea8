"""Models larger than one machine: pipeline and expert parallelism on MLX's distributed engine.

``mlx.launch`` starts one process per rank (ring backend over TCP). ``group`` notices the launch and joins
the ranks (a side channel first, so a rank that never comes is named instead of waited for); ``watchdog``
keeps that side channel beating and stops every rank with one line when one dies or hangs; ``plan`` says
which layers or experts each rank holds; ``load`` reads only those tensors; ``sharded`` is the model rank 0
drives (the generation code, chat and server see an ordinary model) and ``follower`` the loop the other
ranks run; ``protocol`` carries rank 0's commands; ``experts`` is the expert-parallel switch layer.
"""

from .launch import launched

__all__ = ["launched"]
