"""Task affinity and grouping (``mtl-affinity``): one module per measure, the grouping
search, the outputs and the command (:mod:`mtl_runner.affinity.command`)."""
