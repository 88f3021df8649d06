"""The measurements behind `mambakit bench` (the command itself is ``mambakit.bench``).

One module per sub-command (cpu_vs_hf, kernels, generate, scaling, train), each with ``add_arguments(parser)``
and ``run(args) -> payload``; ``common`` holds timing, environment and JSON helpers, ``models`` the model
shapes and the transformers twins, ``report`` the tables, plots and the summary of a results folder.
"""
